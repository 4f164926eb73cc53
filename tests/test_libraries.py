"""Threads of one process that reach the model libraries at once (two runs, two tasks) must not break their imports.

diffusers and transformers import lazily; two threads doing the first access at
once could see a half-imported module (``cannot import name 'PNDMScheduler' from
'diffusers'``). Each check runs in a fresh interpreter, where nothing is imported
yet, with thread exceptions collected.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import threading

    from diffcolor.method.diffusion import build_noise_scheduler, build_sampling_scheduler
    from diffcolor.method.tiny import write_tiny_tokenizer

    raw = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
    barrier = threading.Barrier(6)
    errors = []

    def work(index, folder):
        barrier.wait()
        try:
            if index % 3 == 0:
                build_noise_scheduler(raw)
            elif index % 3 == 1:
                build_sampling_scheduler(raw)
            else:
                write_tiny_tokenizer(folder)
            # what the model loader, the doctor and the tiny writer then reach
            if index % 2:
                from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline  # noqa: F401
            else:
                from diffusers import DDIMScheduler, UNet2DConditionModel  # noqa: F401
                from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401
        except BaseException as error:  # every failure of a thread is the test's
            errors.append(repr(error))

    import pathlib, sys, tempfile
    with tempfile.TemporaryDirectory() as root:
        threads = [threading.Thread(target=work, args=(i, pathlib.Path(root, f"t{i}"))) for i in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    print(errors)
    sys.exit(1 if errors else 0)
""")


def test_first_use_of_the_model_libraries_from_several_threads_at_once():
    for _ in range(3):  # the race shows in most fresh processes without the lock; three make a miss unlikely
        done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr[-2000:]
