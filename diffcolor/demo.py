"""``make demo``: colourise the bundled demo collection with embedded defaults.

The demo photographs are public-domain images that scikit-image ships
(converted to gray here, so nothing is downloaded). With Stable Diffusion
weights on disk and a GPU the demo runs the ``default`` preset on them;
otherwise it says so, explains how to get weights, and runs the same pipeline
on the tiny random bundle as a smoke run, labelled as such on the terminal, in
the report and in every output record.
"""

from __future__ import annotations

import argparse
import html
import os
import sys
from pathlib import Path

import numpy as np

# item id, scikit-image sample, caption, colour map for a second version (or None)
DEMO_ITEMS = (
    ("camera", "camera", "a man in a coat with a camera on a tripod in a field with buildings and sky", {"coat": "black", "sky": "blue"}),
    ("astronaut", "astronaut", "an astronaut in a spacesuit with a flag", {"flag": "red"}),
    ("chelsea", "chelsea", "a cat with striped fur sitting on a floor", {"cat": "orange"}),
    ("coffee", "coffee", "a cup of coffee on a saucer on a wooden table", {"cup": "white", "table": "brown"}),
    ("rocket", "rocket", "a rocket on a launch pad beside a tower under a sky", None),
)
SD_CANDIDATES = ("stable-diffusion-v1-5/stable-diffusion-v1-5", "runwayml/stable-diffusion-v1-5")
HOW_TO_GET_WEIGHTS = """\
No Stable Diffusion weights and GPU found, so this demo is a SMOKE RUN on the tiny random bundle.
To colourise for real:
  1. on a machine with internet access:  huggingface-cli download stable-diffusion-v1-5/stable-diffusion-v1-5
                                          huggingface-cli download openai/clip-vit-large-patch14
     (or copy a diffusers-layout folder of any SD 1.x/2.x-base model)
  2. copy the Hugging Face cache (~/.cache/huggingface) to this machine, or set
     DIFFCOLOR_MODEL=/path/to/model-folder
  3. run `make demo` again on a machine with an NVIDIA GPU."""


def write_demo_sources(folder: Path) -> list[tuple[str, Path, str, dict | None]]:
    """Writes the demo photographs as 8-bit gray PNGs; returns (item id, path, caption, colour map)."""
    import skimage.data
    from PIL import Image
    from skimage.color import rgb2gray

    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for item_id, sample, caption, color_map in DEMO_ITEMS:
        image = getattr(skimage.data, sample)()
        gray = image if image.ndim == 2 else np.round(rgb2gray(image[..., :3]) * 255).astype(np.uint8)
        path = folder / f"{item_id}.png"
        Image.fromarray(gray, mode="L").save(path)
        items.append((item_id, path, caption, color_map))
    return items


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
        except Exception:  # not in the cache
            continue
    return None


def write_report(path: Path, records: list[dict], smoke: bool, output_root: Path) -> None:
    """A small contact sheet: source, colour versions and key metrics per item."""
    rows = []
    for record in records:
        if record["status"] != "done":
            rows.append(f"<tr><td>{html.escape(record['item_id'])}</td><td colspan=3>{html.escape(record['status'])}: "
                        f"{html.escape(str(record['error_message']))}</td></tr>")
            continue
        source = os.path.relpath(record["source_uri"], output_root)
        access = os.path.relpath(record["outputs"]["access"], output_root)
        prompt = record.get("target_prompt") or f"(primary) {record['caption']}"
        rows.append(
            f"<tr><td>{html.escape(record['item_id'])} v{record['version']}</td>"
            f"<td><img src='{html.escape(source)}' width=240></td><td><img src='{html.escape(access)}' width=240></td>"
            f"<td>{html.escape(prompt)}<br>max &Delta;L* {record['max_delta_l']:.2f} &middot; colourfulness "
            f"{record['colorfulness']:.1f} &middot; CLIP {record['clip_score']:.1f} &middot; alignment "
            f"{record['alignment_confidence']:.2f}</td></tr>"
        )
    banner = ("<p style='background:#fdd;padding:8px'><b>SMOKE RUN</b>: random-weight tiny bundle. "
              "These images test the pipeline; they are not colourisations.</p>") if smoke else ""
    path.write_text(
        "<!doctype html><meta charset=utf-8><title>DiffColor Archive demo</title>"
        f"<h1>DiffColor Archive demo</h1>{banner}<table border=1 cellpadding=4>"
        "<tr><th>item</th><th>gray source</th><th>colourised</th><th>prompt and metrics</th></tr>"
        + "".join(rows) + "</table>",
        encoding="utf-8",
    )


def main(argv: list[str] | None = None) -> int:
    from diffcolor.errors import DiffColorError
    from diffcolor.models import load_models
    from diffcolor.pipeline import ItemRequest, colorize_item
    from diffcolor.presets import get_preset

    parser = argparse.ArgumentParser(prog="python -m diffcolor.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo-output", help="output folder (default: demo-output)")
    args = parser.parse_args(argv)
    root = Path(args.out).resolve()

    # 1. Real weights and a GPU, or a labelled smoke run on the tiny bundle.
    model = find_real_weights()
    if model is None:
        print(HOW_TO_GET_WEIGHTS)
        model, preset = "tiny", "smoke"
    else:
        preset = "default"
    try:
        models = load_models(model, device="cuda" if model != "tiny" else "cpu")
    except DiffColorError as error:
        print(f"diffcolor demo: error: {error}", file=sys.stderr)
        return 2
    smoke = models.random_weights
    label = "SMOKE RUN (tiny random bundle)" if smoke else f"model {model}"
    print(f"\n== DiffColor Archive demo: {label}, preset '{preset}', output {root} ==")

    # 2. The demo collection, colourised item by item.
    config = get_preset(preset)
    records = []
    for item_id, path, caption, color_map in write_demo_sources(root / "sources"):
        request = ItemRequest(item_id=item_id, source_uri=str(path), caption=caption, color_map=color_map or {})
        try:
            item_records = colorize_item(models, request, str(root / "items" / item_id), config, preset=preset)
        except DiffColorError as error:
            item_records = [{"item_id": item_id, "status": "failed", "error_message": str(error)}]
        records += item_records
        for record in item_records:
            if record["status"] == "done":
                print(f"  {item_id:<10} v{record['version']} {record['seconds'].get('stage1', 0) + record['seconds'].get('stage2', 0) + record['seconds'].get('render', 0):6.1f} s  "
                      f"max dL* {record['max_delta_l']:.2f}  colourfulness {record['colorfulness']:5.1f}  "
                      f"prompt: {record.get('target_prompt') or caption}")
            else:
                print(f"  {item_id:<10} {record['status']}: {record['error_message']}")

    # 3. The report.
    write_report(root / "report.html", records, smoke, root)
    failed = sum(1 for record in records if record["status"] != "done")
    print(f"\nreport: {root / 'report.html'}   items: {len(DEMO_ITEMS)}   failed: {failed}")
    if smoke:
        print("SMOKE RUN: outputs test the pipeline only; see above for how to get Stable Diffusion weights.")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
