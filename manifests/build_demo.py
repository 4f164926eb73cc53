"""Regenerates the demo collection: ``manifests/demo/*.png`` and ``manifests/demo.parquet``.

The photographs are scikit-image's bundled sample data (no download; public
domain or CC0, see DEMO_ITEMS and manifests/README.md), converted to 8-bit
gray the way a scan of a black-and-white print would arrive. The manifest uses
relative image URIs (``demo/camera.png``), which resolve against the
manifest's own folder, so it works from any working directory.

    .venv/bin/python manifests/build_demo.py
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np

from diffcolor.archive import storage
from diffcolor.archive.manifest import DEFAULT_SEED, manifest_table, validate_table, write_manifest

HERE = Path(__file__).resolve().parent
MAX_SIDE = 512  # long side in pixels, to keep the committed images small

# Each caption says what is in the photograph, in words a colour map can target
# (content words, one colour word each). Licence notes are scikit-image's own.
DEMO_ITEMS = (
    {
        "item_id": "camera",
        "sample": "camera",
        "caption": "a man in a coat filming with a camera on a tripod on a grass field, with buildings and sky behind",
        "color_map": {"coat": "black", "grass": "green", "sky": "blue"},
        "title": "Cameraman on a field",
        "creator": "Lav Varshney",
        "rights": "CC0 1.0 (no copyright restrictions), per scikit-image",
        "source": "scikit-image skimage.data.camera()",
    },
    {
        "item_id": "astronaut",
        "sample": "astronaut",
        "caption": "a smiling astronaut in a spacesuit holding a helmet, beside a flag and a model space shuttle",
        "color_map": {"spacesuit": "orange", "flag": "red"},
        "target_prompts": ["a smiling astronaut in a white spacesuit holding a helmet, beside a flag and a model space shuttle"],
        "title": "Astronaut Eileen Collins",
        "creator": "NASA",
        "rights": "Public domain (NASA; no known copyright restrictions), per scikit-image",
        "source": "scikit-image skimage.data.astronaut(); NASA Great Images, https://flic.kr/p/r9qvLn",
    },
    {
        "item_id": "chelsea",
        "sample": "chelsea",
        "caption": "a close-up of a tabby cat with striped fur, large eyes, long whiskers and a small nose",
        "color_map": {"fur": "brown", "eyes": "green"},
        "title": "Chelsea the cat",
        "creator": "Stefan van der Walt",
        "rights": "CC0 1.0 (no copyright restrictions), per scikit-image",
        "source": "scikit-image skimage.data.chelsea()",
    },
    {
        "item_id": "coffee",
        "sample": "coffee",
        "caption": "a cup of espresso on a saucer with a spoon, on a wooden table",
        "color_map": {"cup": "red", "saucer": "red", "table": "brown"},
        "title": "Coffee cup",
        "creator": "Rachel Michetti (courtesy of Pikolo Espresso Bar)",
        "rights": "CC0 1.0 (no copyright restrictions), per scikit-image",
        "source": "scikit-image skimage.data.coffee()",
    },
    {
        "item_id": "rocket",
        "sample": "rocket",
        "caption": "a rocket on a launch pad between lattice towers with lights, under an evening sky",
        "target_prompts": ["a white rocket on a launch pad between lattice towers with orange lights, under a deep blue evening sky"],
        "seed": 7,
        "title": "Falcon 9 with DSCOVR before launch, Cape Canaveral, 2015",
        "creator": "SpaceX",
        "rights": "Public domain (released by SpaceX), per scikit-image",
        "source": "scikit-image skimage.data.rocket(); https://www.flickr.com/photos/spacexphotos/16511594820/",
    },
    {
        "item_id": "coins",
        "sample": "coins",
        "caption": "ancient greek coins with heads and figures, laid out in rows on a cloth",
        "color_map": {"coins": "silver"},
        "title": "Greek coins from Pompeii",
        "creator": "Brooklyn Museum (photographer unknown)",
        "rights": "No known copyright restrictions (Brooklyn Museum), per scikit-image",
        "source": "scikit-image skimage.data.coins(); https://www.brooklynmuseum.org/opencollection/archives/image/51611",
    },
)
CATALOGUE_COLUMNS = ["title", "creator", "rights", "source"]


def gray_png(sample: str) -> bytes:
    """The scikit-image sample as an 8-bit gray PNG, long side at most MAX_SIDE."""
    import skimage.data
    from PIL import Image
    from skimage.color import rgb2gray

    image = getattr(skimage.data, sample)()
    gray = image if image.ndim == 2 else np.round(rgb2gray(image[..., :3]) * 255).astype(np.uint8)
    picture = Image.fromarray(gray, mode="L")
    if max(picture.size) > MAX_SIDE:
        scale = MAX_SIDE / max(picture.size)
        picture = picture.resize((round(picture.width * scale), round(picture.height * scale)), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def main() -> int:
    # 1. The gray photographs.
    rows = []
    for item in DEMO_ITEMS:
        storage.write_bytes(str(HERE / "demo" / f"{item['item_id']}.png"), gray_png(item["sample"]))
        row = {key: value for key, value in item.items() if key != "sample"}
        row.update(image_uri=f"demo/{item['item_id']}.png", collection="demo", seed=item.get("seed", DEFAULT_SEED))
        rows.append(row)

    # 2. The manifest, validated before it is written.
    table = manifest_table(rows, CATALOGUE_COLUMNS)
    problems = validate_table(table)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        return 1
    write_manifest(table, str(HERE / "demo.parquet"))
    print(f"wrote {len(rows)} gray photographs to {HERE / 'demo'} and the manifest {HERE / 'demo.parquet'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
