"""What a real colourisation must show, on real Stable Diffusion weights and a GPU (marked `real_weights`).

Excluded by default. On a GPU host with weights (docs/REAL_WEIGHTS.md)::

    DIFFCOLOR_SD_MODEL=/models/stable-diffusion-v1-5 pytest -m real_weights tests/test_real_weights.py

``DIFFCOLOR_SD_MODEL`` is a diffusers-layout folder or a hub id in the local
cache; ``DIFFCOLOR_CLIP_MODEL`` optionally names the CLIP (default: the
bundle's ``clip/`` or openai/clip-vit-large-patch14); ``DIFFCOLOR_SET`` optionally
overrides preset fields, ``FIELD=VALUE`` separated by spaces (``--set``'s form), e.g.
``stage1.loss_decode_side=224`` to compare the reduced stage-1 decode. Selected without them,
the tests fail saying what is missing: a check that was asked for is never
skipped silently.

Two demo items run at the ``default`` preset: ``camera`` (a colour map) and
``astronaut`` (a free target prompt that lines up with its caption, and a
colour map). Each rendered version must show colour
well above its gray source (colourfulness), keep the source's lightness
(max delta L*), and score higher in CLIP against its target than the
caption-only primary colourisation does: the target, not chance, made the
colours.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import tifffile
import torch

from diffcolor.archive.items import ItemLayout
from diffcolor.archive.manifest import read_items
from diffcolor.archive.states import read_state
from diffcolor.method.diffusion import clip_score
from diffcolor.method.metrics import colorfulness
from diffcolor.method.presets import apply_overrides, get_preset
from diffcolor.method.state import state_from_bytes
from diffcolor.pipeline import colorize_item

pytestmark = pytest.mark.real_weights

DEMO_MANIFEST = Path(__file__).resolve().parent.parent / "manifests" / "demo.parquet"
# What a real colourisation shows (docs/REAL_WEIGHTS.md gives the figures measured so far).
MIN_COLORFULNESS = 15.0  # Hasler-Suesstrunk; a gray image scores 0, a muted colour photograph about 15-35
MAX_DELTA_L = 1.0  # L* units: the master keeps the source's lightness up to rounding
MIN_CLIP_GAIN = 0.0  # the render's CLIP score against its target exceeds the primary's against the same target


@pytest.fixture(scope="module")
def real_models(cache_dir):
    model = os.environ.get("DIFFCOLOR_SD_MODEL")
    if not model:
        pytest.fail("DIFFCOLOR_SD_MODEL is not set: name a Stable Diffusion folder or cached hub id "
                    "(docs/REAL_WEIGHTS.md)")
    if not torch.cuda.is_available():
        pytest.fail("no CUDA device: the real-weights check runs the default preset, which needs a GPU")
    from diffcolor.method.models import load_models

    models = load_models(model, clip=os.environ.get("DIFFCOLOR_CLIP_MODEL"), device="cuda")
    if models.random_weights:
        pytest.fail(f"{model} declares random weights: this check needs real Stable Diffusion weights")
    return models


@pytest.mark.parametrize("item_id", ["camera", "astronaut"])
def test_a_real_colourisation_has_colour_keeps_lightness_and_follows_its_target(real_models, tmp_path, item_id):
    request = next(read_items(str(DEMO_MANIFEST), items={item_id}))
    out = str(tmp_path / item_id)
    overrides = dict(pair.split("=", 1) for pair in os.environ.get("DIFFCOLOR_SET", "").split())
    config = apply_overrides(get_preset("default"), {key: json.loads(value) for key, value in overrides.items()})
    records = colorize_item(real_models, request, out, config)
    layout = ItemLayout(out)
    state = state_from_bytes(read_state(layout.state), layout.state_object)

    for record in records:
        assert record["status"] == "done" and record["kind"] == "render"
        figure = colorfulness(tifffile.imread(record["outputs"]["master"]))
        assert figure >= MIN_COLORFULNESS, f"{item_id} v{record['version']}: colourfulness {figure:.1f}"
        assert record["max_delta_l"] <= MAX_DELTA_L
        # The primary (caption only) against the same target, at the same resolution as the scored render.
        primary = clip_score(real_models, state.primary.to(real_models.device), record["target_prompt"])
        gain = record["clip_score"] - primary
        print(f"{item_id} v{record['version']} ({record['prompt_alignment']}): colourfulness {figure:.1f}, "
              f"max dL* {record['max_delta_l']:.2f}, CLIP {record['clip_score']:.2f} vs primary {primary:.2f}")
        assert gain > MIN_CLIP_GAIN, f"{item_id}: CLIP {record['clip_score']:.2f} <= primary {primary:.2f}"
