"""``make demo``: run the collection flow on the bundled demo collection with embedded defaults.

The demo collection is ``manifests/demo.parquet``: public-domain photographs
that scikit-image ships, converted to gray, with captions and colour maps.
The run uses the local defaults: Prefect's local mode (no server to start),
the local device pool and local storage. With Stable Diffusion weights on
disk and a GPU it runs the ``default`` preset; otherwise it says so, explains
how to get weights, and runs the same flow on the tiny random bundle as a
smoke run, labelled as such on the terminal, in the report and in every
output record and image's metadata.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEMO_MANIFEST = Path(__file__).resolve().parent.parent / "manifests" / "demo.parquet"
SD_CANDIDATES = ("stable-diffusion-v1-5/stable-diffusion-v1-5", "runwayml/stable-diffusion-v1-5")
HOW_TO_GET_WEIGHTS = """\
No Stable Diffusion weights and GPU found, so this demo is a SMOKE RUN on the tiny random bundle:
the pipeline runs end to end, but the pictures are noise-coloured, not colourisations.
To colourise for real:
  1. on a machine with internet access:  huggingface-cli download stable-diffusion-v1-5/stable-diffusion-v1-5
                                          huggingface-cli download openai/clip-vit-large-patch14
     (or copy a diffusers-layout folder of any SD 1.x/2.x-base model)
  2. copy the Hugging Face cache (~/.cache/huggingface) to this machine, or set
     DIFFCOLOR_MODEL=/path/to/model-folder
  3. run `make demo` again on a machine with an NVIDIA GPU."""


def find_real_weights() -> str | None:
    """A local SD folder (DIFFCOLOR_MODEL) or a cached hub model, when a GPU is present too."""
    import torch

    if not torch.cuda.is_available():
        return None
    named = os.environ.get("DIFFCOLOR_MODEL")
    if named:
        return named
    from huggingface_hub import snapshot_download

    for repo in SD_CANDIDATES:
        try:
            snapshot_download(repo, local_files_only=True, allow_patterns=["model_index.json"])
            return repo
        except Exception:  # not in the local cache
            continue
    return None


def main(argv: list[str] | None = None) -> int:
    from flows.cli import main as diffcolor_main

    parser = argparse.ArgumentParser(prog="python -m flows.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo-output", help="output folder (default: demo-output)")
    args = parser.parse_args(argv)

    # 1. Real weights and a GPU, or a labelled smoke run on the tiny bundle.
    model = find_real_weights()
    if model is None:
        print(HOW_TO_GET_WEIGHTS)
        model, preset = "tiny", "smoke"
    else:
        preset = "default"
    label = "SMOKE RUN on the tiny random bundle" if model == "tiny" else f"model {model}"
    print(f"\n== DiffColor Archive demo: {label}, preset '{preset}', manifest {DEMO_MANIFEST.name}, output {args.out} ==\n",
          flush=True)

    # 2. The collection flow, exactly as `diffcolor run` starts it.
    code = diffcolor_main(["run", str(DEMO_MANIFEST), "--out", args.out, "--model", model, "--preset", preset])
    if model == "tiny":
        print("\nSMOKE RUN: the outputs test the pipeline only; see the top of this output for how to get weights.")
    return code


if __name__ == "__main__":
    sys.exit(main())
