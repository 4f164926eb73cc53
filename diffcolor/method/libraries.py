"""The model libraries, imported whole once per process, under a lock.

diffusers and transformers import their classes lazily, on first attribute
access. Two threads of one process doing that first access at once (two flow
runs, or two tasks of one run, each checking or loading a model) can see a
half-imported module and fail with ``ImportError: cannot import name
'PNDMScheduler' from 'diffusers'``. Every entry point of the method that reaches
a model class calls :func:`model_libraries` first: the first caller imports
every class the method uses while the others wait; later calls return at once.

Building a model is serialised too (:data:`MODEL_BUILD_LOCK`): transformers
builds under torch's ``torch.device("meta")`` context, and that context's
current device is one global of the process, saved on entry and restored on
exit. Two threads building at once can restore each other's saved value and
leave the whole process's default device at ``meta``: every tensor made
afterwards has no data (``Cannot copy out of meta tensor``).
"""

from __future__ import annotations

import threading

_LOCK = threading.Lock()
_DONE = False
# Held while a model is built or loaded (from_pretrained, a config's model, accelerate's empty weights).
MODEL_BUILD_LOCK = threading.RLock()


def model_libraries() -> None:
    """Imports every diffusers and transformers class the method uses, once, before any thread uses them."""
    global _DONE
    if _DONE:
        return
    with _LOCK:
        if _DONE:
            return
        from transformers.utils import logging as transformers_logging

        verbosity = transformers_logging.get_verbosity()
        transformers_logging.set_verbosity_error()  # the SD pipeline class warns that CLIP's processor wants torchvision
        try:
            import diffusers
            import transformers

            for name in ("AutoencoderKL", "UNet2DConditionModel", "DDIMScheduler", "DDPMScheduler", "PNDMScheduler",
                         "StableDiffusionPipeline"):
                getattr(diffusers, name)
            for name in ("CLIPConfig", "CLIPModel", "CLIPTextConfig", "CLIPTextModel", "CLIPTokenizer"):
                getattr(transformers, name)
            import diffusers.utils.logging  # noqa: F401  (the doctor's verbosity switch)
        finally:
            transformers_logging.set_verbosity(verbosity)
        _DONE = True
