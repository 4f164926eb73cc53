"""Regenerates the ground-truth demo set: ``manifests/eval/*.png`` and ``manifests/eval-demo.parquet``.

Four colour photographs that scikit-image ships with its package (no
download; public domain or CC0, see EVAL_ITEMS and manifests/README.md), kept
in colour as ground truths, long side 384 px. ``diffcolor eval`` converts each
to gray itself (keeping CIE L*), colourises it and compares the result with the
original. Captions describe the photographs with their true colours, so the
CLIP score of the ground truth is a meaningful reference.

    .venv/bin/python manifests/build_eval_demo.py
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

from diffcolor.archive import storage
from diffcolor.archive.manifest import DEFAULT_SEED, manifest_table, validate_table, write_manifest

HERE = Path(__file__).resolve().parent
MAX_SIDE = 384  # long side in pixels: small committed files and a fast eval on a CPU

EVAL_ITEMS = (
    {
        "item_id": "astronaut",
        "sample": "astronaut",
        "caption": "a smiling astronaut in an orange spacesuit holding a white helmet, beside an american flag and a model space shuttle",
        "title": "Astronaut Eileen Collins",
        "creator": "NASA",
        "rights": "Public domain (NASA; no known copyright restrictions), per scikit-image",
        "source": "scikit-image skimage.data.astronaut(); NASA Great Images, https://flic.kr/p/r9qvLn",
    },
    {
        "item_id": "chelsea",
        "sample": "chelsea",
        "caption": "a close-up of a tabby cat with ginger striped fur, green eyes, white whiskers and a pink nose",
        "title": "Chelsea the cat",
        "creator": "Stefan van der Walt",
        "rights": "CC0 1.0 (no copyright restrictions), per scikit-image",
        "source": "scikit-image skimage.data.chelsea()",
    },
    {
        "item_id": "coffee",
        "sample": "coffee",
        "caption": "a red cup of espresso on a red saucer with a silver spoon, on a brown wooden table",
        "title": "Coffee cup",
        "creator": "Rachel Michetti (courtesy of Pikolo Espresso Bar)",
        "rights": "CC0 1.0 (no copyright restrictions), per scikit-image",
        "source": "scikit-image skimage.data.coffee()",
    },
    {
        "item_id": "rocket",
        "sample": "rocket",
        "caption": "a white rocket on a launch pad between gray lattice towers with orange lights, under a deep blue evening sky",
        "title": "Falcon 9 with DSCOVR before launch, Cape Canaveral, 2015",
        "creator": "SpaceX",
        "rights": "Public domain (released by SpaceX), per scikit-image",
        "source": "scikit-image skimage.data.rocket(); https://www.flickr.com/photos/spacexphotos/16511594820/",
    },
)
CATALOGUE_COLUMNS = ["title", "creator", "rights", "source"]


def colour_png(sample: str) -> bytes:
    """The scikit-image sample as an 8-bit RGB PNG, long side at most MAX_SIDE."""
    import skimage.data
    from PIL import Image

    picture = Image.fromarray(getattr(skimage.data, sample)()[..., :3], mode="RGB")
    if max(picture.size) > MAX_SIDE:
        scale = MAX_SIDE / max(picture.size)
        picture = picture.resize((round(picture.width * scale), round(picture.height * scale)), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def main() -> int:
    # 1. The colour ground truths.
    rows = []
    for item in EVAL_ITEMS:
        storage.write_bytes(str(HERE / "eval" / f"{item['item_id']}.png"), colour_png(item["sample"]))
        row = {key: value for key, value in item.items() if key != "sample"}
        # image_uri is required by the schema; an eval never reads it (it colourises the
        # gray it derives from the ground truth), so it names the ground truth too.
        uri = f"eval/{item['item_id']}.png"
        row.update(image_uri=uri, ground_truth_uri=uri, collection="eval-demo", seed=DEFAULT_SEED)
        rows.append(row)

    # 2. The manifest, validated before it is written.
    table = manifest_table(rows, CATALOGUE_COLUMNS)
    problems = validate_table(table)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        return 1
    write_manifest(table, str(HERE / "eval-demo.parquet"))
    print(f"wrote {len(rows)} colour ground truths to {HERE / 'eval'} and the manifest {HERE / 'eval-demo.parquet'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
