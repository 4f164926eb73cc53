"""Reduced random bundles: a published Stable Diffusion's structure at toy width, built from its configs.

    python -m diffcolor.tools.reduced CONFIGS OUT [--seed N]

``write_reduced_bundle(configs, folder)`` reads a folder of published configs
in the diffusers layout (``model_index.json``, ``scheduler/scheduler_config.json``,
``unet/config.json``, ``vae/config.json``, ``text_encoder/config.json``,
``tokenizer/tokenizer_config.json``, ``tokenizer/special_tokens_map.json``;
the test fixtures in ``tests/fixtures/sd_configs/`` hold SD 1.5, 2.1-base and
2.1) and writes a bundle with random weights that has the real model's
structure but runs a smoke item in seconds on a CPU. Like the tiny bundle
(:mod:`diffcolor.method.tiny`) it is saved with ``save_pretrained`` in
safetensors, carries a toy CLIP in ``clip/`` and the random-weights marker, and
is loaded by :func:`diffcolor.method.models.load_models` like real weights: the
method never knows. What it adds over the tiny bundle is that the settings which
differ between SD versions (v-prediction, linear projections, per-block heads,
upcast attention, GELU, the "!" pad token) are exactly the published ones.

Kept as published:

- UNet: every key not listed below, among them the down, mid and up block types
  and their count, ``attention_head_dim`` (an int for SD 1.x, a per-block list
  for SD 2.x, values unchanged: each block has the published number of heads),
  ``use_linear_projection``, ``upcast_attention``, ``only_cross_attention``,
  ``in_channels``/``out_channels``, ``sample_size``, the time embedding; and
  ``cross_attention_dim`` equal to the text encoder's width, as published.
- VAE: block types and count (so it downsamples by 8), ``latent_channels``,
  ``scaling_factor`` (absent in SD's configs: diffusers' 0.18215), ``sample_size``.
- Text encoder: ``hidden_act`` (``quick_gelu`` for SD 1.x, ``gelu`` for 2.x),
  ``num_attention_heads``, ``max_position_embeddings`` (77), ``layer_norm_eps``.
- Tokenizer: the special tokens as transformers reads them
  (``special_tokens_map.json`` over ``tokenizer_config.json``: SD 2.x pads
  with "!"), ``model_max_length``.
- Scheduler: ``scheduler_config.json`` copied byte for byte (class,
  ``prediction_type``, betas, ``steps_offset``, ``clip_sample``); the method
  corrects what it must at use (:func:`diffcolor.method.diffusion.scheduler_settings`).

Shrunk:

- Widths divided by :data:`WIDTH_DIVISOR` (8): UNet ``block_out_channels``
  (320, 640, 1280, 1280 -> 40, 80, 160, 160), VAE ``block_out_channels``
  (128 ... 512 -> 16 ... 64), text ``hidden_size`` and ``intermediate_size``
  (768 -> 96, 1024 -> 128), hence ``cross_attention_dim``. Head counts stay,
  so every head is 8 times narrower.
- ``norm_num_groups`` 32 -> 8 (groups must divide the shrunk widths).
- ``layers_per_block`` 2 -> 1 (UNet and VAE); text ``num_hidden_layers`` -> 2.
- The vocabulary: the tiny bundle's BPE over :data:`~diffcolor.method.tiny.TINY_WORDS`
  instead of CLIP's 49408 entries; the text config's token ids are that tokenizer's.
- CLIP for the losses and the score: the tiny bundle's toy CLIP around the
  reduced text tower (the real method uses ViT-L/14).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from diffcolor.method.models import TINY_MARKER
from diffcolor.method.tiny import (
    tiny_clip_config,
    write_clip_folder,
    write_tiny_tokenizer,
)

WIDTH_DIVISOR = 8  # ours: keeps every published head count whole (40 / 8 heads, 40 / 5 heads, 96 / 12, 128 / 16)
NORM_GROUPS = 8  # ours: divides every shrunk width (16 ... 160)
LAYERS_PER_BLOCK = 1  # ours: SD has 2; one resnet (and transformer) per block keeps every block type present
TEXT_LAYERS = 2  # ours: SD 1.x has 12, SD 2.x 23 (OpenCLIP's 24 less the last)
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")
# Keys of a published text_encoder/config.json that name the checkpoint or the writer, not the model.
TEXT_BOOKKEEPING = ("_name_or_path", "architectures", "model_type", "torch_dtype", "dtype", "transformers_version")


def read_configs(configs: Path) -> dict[str, dict]:
    """The published configs of a bundle folder, by component; ValueError naming a missing or broken file."""
    files = {
        "model_index": "model_index.json",
        "scheduler": "scheduler/scheduler_config.json",
        "unet": "unet/config.json",
        "vae": "vae/config.json",
        "text_encoder": "text_encoder/config.json",
        "tokenizer": "tokenizer/tokenizer_config.json",
        "special_tokens": "tokenizer/special_tokens_map.json",
    }
    read = {}
    for component, name in files.items():
        path = configs / name
        if not path.is_file():
            raise ValueError(f"published config folder '{configs}' has no {name}")
        try:
            read[component] = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from None
    return read


def special_tokens(tokenizer_config: dict, special_tokens_map: dict) -> dict[str, str]:
    """bos/eos/unk/pad as transformers resolves them: ``special_tokens_map.json`` wins over ``tokenizer_config.json``."""
    resolved = {}
    for key in SPECIAL_TOKENS:
        value = special_tokens_map.get(key, tokenizer_config.get(key))
        if isinstance(value, dict):  # an AddedToken written out
            value = value["content"]
        if value is not None:
            resolved[key] = value
    return resolved


def shrink(width: int, what: str) -> int:
    """``width`` divided by :data:`WIDTH_DIVISOR`; ValueError when it does not divide."""
    if width % WIDTH_DIVISOR:
        raise ValueError(f"{what} {width} is not a multiple of {WIDTH_DIVISOR}: cannot shrink it evenly")
    return width // WIDTH_DIVISOR


def reduced_unet_config(published: dict, text_width: int) -> dict:
    """The published UNet config at reduced width; ``text_width`` is the reduced text encoder's width."""
    config = {key: value for key, value in published.items() if not key.startswith("_")}
    config["block_out_channels"] = [shrink(c, "UNet block_out_channels entry") for c in published["block_out_channels"]]
    config["layers_per_block"] = LAYERS_PER_BLOCK
    config["norm_num_groups"] = NORM_GROUPS
    config["cross_attention_dim"] = text_width
    # diffusers reads attention_head_dim as the number of heads (a naming it keeps for SD's configs).
    heads = published.get("num_attention_heads") or published.get("attention_head_dim", 8)
    counts = heads if isinstance(heads, list) else [heads] * len(config["block_out_channels"])
    for channels, count in zip(config["block_out_channels"], counts):
        if channels % count or channels % NORM_GROUPS:
            raise ValueError(f"reduced UNet width {channels} does not split into {count} heads and {NORM_GROUPS} groups")
    return config


def reduced_vae_config(published: dict) -> dict:
    """The published VAE config at reduced width (same blocks: the same downsampling)."""
    config = {key: value for key, value in published.items() if not key.startswith("_")}
    config["block_out_channels"] = [shrink(c, "VAE block_out_channels entry") for c in published["block_out_channels"]]
    config["layers_per_block"] = LAYERS_PER_BLOCK
    config["norm_num_groups"] = NORM_GROUPS
    return config


def reduced_text_config(published: dict, tokenizer) -> dict:
    """The published text encoder config at reduced width and depth, with ``tokenizer``'s vocabulary and ids."""
    config = {key: value for key, value in published.items() if key not in TEXT_BOOKKEEPING}
    config["hidden_size"] = shrink(published["hidden_size"], "text hidden_size")
    config["intermediate_size"] = shrink(published["intermediate_size"], "text intermediate_size")
    config["num_hidden_layers"] = min(TEXT_LAYERS, published["num_hidden_layers"])
    config["vocab_size"] = len(tokenizer)
    config["bos_token_id"] = tokenizer.bos_token_id
    config["eos_token_id"] = tokenizer.eos_token_id
    config["pad_token_id"] = tokenizer.pad_token_id
    if config["hidden_size"] % config["num_attention_heads"]:
        raise ValueError(f"reduced text width {config['hidden_size']} does not split into "
                         f"{config['num_attention_heads']} heads")
    return config


def reduced_model_index(published: dict) -> dict:
    """The published model index, less the safety checker and feature extractor this bundle does not carry."""
    import diffusers

    index = dict(published, _diffusers_version=diffusers.__version__)  # the version that wrote this bundle
    for component in ("safety_checker", "feature_extractor"):
        if component in index:
            index[component] = [None, None]
    index["requires_safety_checker"] = False
    return index


def _write_bundle_tokenizer(folder: Path, published: dict[str, dict]):
    """The tiny vocabulary with the published special tokens and length, saved to ``folder`` and loaded back."""
    from transformers import CLIPTokenizer

    write_tiny_tokenizer(folder, **special_tokens(published["tokenizer"], published["special_tokens"]))
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    tokenizer.model_max_length = published["tokenizer"].get("model_max_length", 77)
    tokenizer.save_pretrained(folder)
    return tokenizer


def _reduced_modules(published: dict[str, dict], tokenizer, seed: int) -> tuple:
    """UNet, VAE, text encoder and toy CLIP at reduced width, drawn from ``seed`` in that order."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPModel, CLIPTextConfig, CLIPTextModel

    unet_config, text_config = published["unet"], published["text_encoder"]
    if unet_config["cross_attention_dim"] != text_config["hidden_size"]:
        raise ValueError(f"published cross_attention_dim {unet_config['cross_attention_dim']} differs from the "
                         f"text encoder's hidden_size {text_config['hidden_size']}: not a Stable Diffusion pair")
    text_config = CLIPTextConfig(**reduced_text_config(text_config, tokenizer))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(reduced_unet_config(unet_config, text_config.hidden_size))
        vae = AutoencoderKL.from_config(reduced_vae_config(published["vae"]))
        text_encoder = CLIPTextModel(text_config)
        clip = CLIPModel(tiny_clip_config(text_config))
    return unet, vae, text_encoder, clip


def write_reduced_bundle(configs: Path, folder: Path, *, seed: int = 0) -> Path:
    """Writes a reduced random bundle of the published configs in ``configs`` to ``folder`` (created; files replaced).

    Returns the folder. Needs no network; takes seconds on a CPU. Raises
    ValueError naming the file or the setting when the configs are incomplete
    or cannot be shrunk evenly (see the module docstring for what is kept).
    """
    from transformers.utils import logging as transformers_logging

    configs, root = Path(configs), Path(folder)
    transformers_logging.disable_progress_bar()

    # 1. Read the published configs; the tokenizer comes first, since its vocabulary sizes the text encoder.
    published = read_configs(configs)
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = _write_bundle_tokenizer(root / "tokenizer", published)

    # 2. Random modules at reduced width with the published structure.
    unet, vae, text_encoder, clip = _reduced_modules(published, tokenizer, seed)

    # 3. Save in the diffusers and transformers layouts; the scheduler config as published, byte for byte.
    unet.save_pretrained(root / "unet", safe_serialization=True)
    vae.save_pretrained(root / "vae", safe_serialization=True)
    text_encoder.save_pretrained(root / "text_encoder", safe_serialization=True)
    (root / "scheduler").mkdir(exist_ok=True)
    shutil.copyfile(configs / "scheduler" / "scheduler_config.json", root / "scheduler" / "scheduler_config.json")
    (root / "model_index.json").write_text(json.dumps(reduced_model_index(published["model_index"]), indent=2) + "\n",
                                           encoding="utf-8")
    write_clip_folder(root / "clip", clip, tokenizer)

    # 4. Say what the weights are: every output of this bundle is a smoke run.
    (root / TINY_MARKER).write_text(
        f"Random weights at reduced width, with the structure of the published configs in '{configs.name}', "
        "for tests and smoke runs only. Outputs are noise-coloured, not colourisations.\n",
        encoding="utf-8",
    )
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffcolor.tools.reduced", description=__doc__.splitlines()[0])
    parser.add_argument("configs", type=Path, help="folder of published configs in the diffusers layout")
    parser.add_argument("out", type=Path, help="folder to write the bundle to")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    args = parser.parse_args(argv)
    try:
        folder = write_reduced_bundle(args.configs, args.out, seed=args.seed)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"reduced random bundle of {args.configs} written to {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
