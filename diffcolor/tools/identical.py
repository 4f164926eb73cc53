"""Do two checkouts write the same bytes? Smoke items colourised by each, every output's sha256 compared.

    python -m diffcolor.tools.identical --compare-with OTHER_CHECKOUT

For a change that must not change behaviour (a refactor, a dependency bump),
this runs the same items through this checkout's ``diffcolor`` and another
checkout's, on the CPU with the tiny bundle and the ``smoke`` preset, each in
fresh processes with its own cache (so each writes its own tiny bundle), and
compares the sha256 of every archival master, access copy and colour state (with its diffusers LoRA):

- an 8-bit gray PNG with a target prompt and a colour map (three versions), then
  a ``recolor`` of it from its stored colour state (a fourth);
- a sepia-toned RGB PNG (the toned-input path: gray derived keeping L*);
- a 16-bit gray TIFF (16-bit master).

Exit 0 when every file is identical, 1 otherwise (the differing files listed).
A checkout's command comes from its ``pyproject.toml`` as in
:mod:`diffcolor.tools.startup`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from diffcolor.archive.layout import STATE, VERSIONS
from diffcolor.tools.startup import HERE, entry_point

SOURCE = HERE / "manifests" / "demo" / "camera.png"
CAPTION = "A man standing with a camera, with grassland and sky"


def write_inputs(folder: Path) -> dict[str, Path]:
    """The three smoke inputs, derived from the demo collection's camera photograph."""
    gray = np.asarray(Image.open(SOURCE).convert("L"), dtype=np.float64) / 255.0
    sepia = np.stack([gray**0.9, gray, gray**1.25], axis=-1)  # warm highlights, cool shadows: a toned print
    paths = {"gray8": folder / "gray8.png", "sepia": folder / "sepia.png", "gray16": folder / "gray16.tif"}
    Image.fromarray(np.round(gray * 255).astype(np.uint8)).save(paths["gray8"])
    Image.fromarray(np.round(sepia * 255).astype(np.uint8)).save(paths["sepia"])
    Image.fromarray(np.round(gray * 65535).astype(np.uint16)).save(paths["gray16"])
    return paths


def run_items(checkout: Path, inputs: dict[str, Path], out: Path) -> dict[str, str]:
    """Colourises (and recolours) the inputs with ``checkout``'s command; returns output path -> sha256."""
    module, function = entry_point(checkout).split(":")
    code = f"import sys; sys.argv[0] = 'diffcolor'; from {module} import {function} as main; sys.exit(main())"
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([str(checkout), os.environ.get("PYTHONPATH", "")]),
                       DIFFCOLOR_CACHE=str(out / "cache"))
    common = ["--model", "tiny", "--preset", "smoke", "--device", "cpu"]
    commands = [
        ["colorize", str(inputs["gray8"]), "--caption", CAPTION, "--target", "a photo of a man with a red camera",
         "--color-map", '{"man": "brown"}', "--seed", "7", "--out", str(out / "gray8"), *common],
        ["recolor", str(out / "gray8"), "--color-map", '{"camera": "green"}', "--device", "cpu"],
        ["colorize", str(inputs["sepia"]), "--caption", CAPTION, "--seed", "3", "--out", str(out / "sepia"), *common],
        ["colorize", str(inputs["gray16"]), "--caption", CAPTION, "--seed", "3", "--out", str(out / "gray16"), *common],
    ]
    for arguments in commands:
        done = subprocess.run([sys.executable, "-c", code, *arguments], cwd=checkout, env=environment,
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{checkout}: diffcolor {arguments[0]} exited {done.returncode}: {done.stderr[-800:]}")
    files = sorted(path for pattern in (f"*/{VERSIONS}/*/*", f"*/{STATE}/*.safetensors", f"*/{STATE}/lora/*.safetensors")
                   for path in out.glob(pattern))
    return {str(path.relative_to(out)): hashlib.sha256(path.read_bytes()).hexdigest() for path in files}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffcolor.tools.identical", description=__doc__.splitlines()[0])
    parser.add_argument("--compare-with", type=Path, required=True, metavar="CHECKOUT", help="the other checkout")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="diffcolor-identical-") as folder:
        inputs = write_inputs(Path(folder))
        theirs = run_items(args.compare_with.resolve(), inputs, Path(folder) / "theirs")
        ours = run_items(HERE, inputs, Path(folder) / "ours")
    different = sorted(name for name in theirs.keys() | ours.keys() if theirs.get(name) != ours.get(name))
    for name in sorted(ours.keys() | theirs.keys()):
        print(f"{'same     ' if name not in different else 'DIFFERENT'} {name} {ours.get(name, '-')[:16]}")
    print(f"{len(ours) - len(different)} of {len(ours | theirs)} files byte-identical with {args.compare_with}")
    return 1 if different or not ours else 0


if __name__ == "__main__":
    sys.exit(main())
