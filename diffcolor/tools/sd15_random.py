"""An SD-1.5-shaped model with random weights, built in memory from the configs below (no download).

Speed does not depend on the weights (docs/DESIGN.md §8), so the benchmark times
the real architecture without needing the real checkpoint: the UNet, VAE and
text encoder of Stable Diffusion 1.5 and a CLIP ViT-L/14, with exactly their
published layer shapes (the configs are copied from the model cards'
``config.json`` files, minus the keys that only name the checkpoint). The
tokenizer reuses the tiny bundle's BPE vocabulary padded to CLIP's 49408
entries, so the embedding tables have SD's shape.

``build_sd15_random_models(device)`` returns a :class:`diffcolor.method.models.Models`
like :func:`diffcolor.method.models.load_models` does, frozen and in eval mode. On the
``meta`` device it allocates nothing (used to count FLOPs at full size on any
machine). The weights are for timing only: outputs are noise.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from diffcolor.common.keys import hash_json
from diffcolor.method.models import Models

NAME = "sd15-random"
VOCAB_SIZE = 49408  # CLIP's BPE vocabulary
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# runwayml/stable-diffusion-v1-5, unet/config.json
UNET_CONFIG = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

# runwayml/stable-diffusion-v1-5, vae/config.json
VAE_CONFIG = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

# openai/clip-vit-large-patch14 text tower (SD 1.5's text_encoder/config.json), token ids of our tokenizer
TEXT_CONFIG = {
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
    "vocab_size": VOCAB_SIZE,
    "bos_token_id": VOCAB_SIZE - 2,
    "eos_token_id": VOCAB_SIZE - 1,
    "pad_token_id": VOCAB_SIZE - 1,
}

# openai/clip-vit-large-patch14, vision tower
VISION_CONFIG = {
    "hidden_act": "quick_gelu",
    "hidden_size": 1024,
    "image_size": 224,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 24,
    "patch_size": 14,
    "projection_dim": 768,
}

# runwayml/stable-diffusion-v1-5, scheduler/scheduler_config.json
SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


def build_tokenizer():
    """A CLIP tokenizer with the tiny bundle's merges and CLIP's vocabulary size (49408, specials last)."""
    from transformers import CLIPTokenizer

    from diffcolor.method.tiny import TINY_WORDS, build_tiny_vocab

    vocab, merges = build_tiny_vocab(sorted(set(TINY_WORDS.split())))
    ordinary = [token for token in sorted(vocab, key=vocab.get) if not token.startswith("<|")]
    padding = [f"<|unused{index}|>" for index in range(VOCAB_SIZE - 2 - len(ordinary))]
    tokens = ordinary + padding + ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory(prefix="sd15-tokenizer-") as folder:
        (Path(folder) / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
        (Path(folder) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        tokenizer = CLIPTokenizer(vocab=str(Path(folder) / "vocab.json"), merges=str(Path(folder) / "merges.txt"))
    tokenizer.model_max_length = 77
    return tokenizer


def model_hash(seed: int = 0) -> str:
    """Stands in for the weight hash of a loaded model: the configs and the seed decide the weights."""
    configs = [UNET_CONFIG, VAE_CONFIG, TEXT_CONFIG, VISION_CONFIG, SCHEDULER_CONFIG, seed]
    return hash_json(configs)


def build_sd15_random_models(device: str | torch.device = "cpu", *, seed: int = 0, weight_dtype: str = "auto") -> Models:
    """SD 1.5 + CLIP ViT-L/14 shapes, random weights drawn in fp32, built directly on ``device``.

    About 1.5 G parameters (6 GB in fp32); on ``meta`` nothing is allocated.
    ``weight_dtype`` stores the frozen matrix weights as :func:`diffcolor.method.models.load_models`
    does ("auto": bf16 on CUDA); the same seed gives the same fp32 draws either way.
    Returns :class:`Models` with ``random_weights=True``.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel
    from transformers.utils import logging as transformers_logging

    from diffcolor.method.performance import frozen_weight_dtype, store_frozen_weights

    device = torch.device(device)
    storage_dtype = frozen_weight_dtype(weight_dtype, device) if device.type != "meta" else torch.float32
    tokenizer = build_tokenizer()
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # CLIPConfig notes the defaults it fills in; they are ours on purpose
    try:
        text_config = CLIPTextConfig(**TEXT_CONFIG)
        clip_config = CLIPConfig(text_config=dict(TEXT_CONFIG), vision_config=dict(VISION_CONFIG), projection_dim=768)
    finally:
        transformers_logging.set_verbosity(verbosity)

    # 1. Build every component on the target device (random init there: fast on a GPU, free on meta).
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.device(device):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**UNET_CONFIG)
        vae = AutoencoderKL(**VAE_CONFIG)
        text_encoder = CLIPTextModel(text_config)
        clip = CLIPModel(clip_config)

    # 2. Frozen, in eval mode and stored in the compute dtype, as load_models leaves real weights.
    for module in (unet, vae, text_encoder, clip):
        module.requires_grad_(False)
        module.eval()
        store_frozen_weights([module], storage_dtype)
    return Models(
        model_id=NAME,
        clip_id=f"{NAME}/clip",
        folder=Path(NAME),
        clip_folder=Path(NAME) / "clip",
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler_config=dict(SCHEDULER_CONFIG),
        clip=clip,
        clip_tokenizer=tokenizer,
        clip_image_size=VISION_CONFIG["image_size"],
        clip_mean=CLIP_MEAN,
        clip_std=CLIP_STD,
        device=device,
        weight_sha256={},
        model_hash=model_hash(seed),
        random_weights=True,
        weight_dtype=storage_dtype,
    )


def parameter_counts(models: Models) -> dict[str, int]:
    """Parameters per component (to check the shapes against SD 1.5's published sizes)."""
    return {
        name: sum(p.numel() for p in getattr(models, name).parameters())
        for name in ("unet", "vae", "text_encoder", "clip")
    }
