"""The tiny random model bundle: real layouts, random weights, for tests and smoke runs.

``write_tiny_bundle(folder)`` builds, offline and in seconds, a Stable Diffusion
bundle in the diffusers layout (``model_index.json``, ``unet/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``) plus a CLIP model in
``clip/`` (transformers layout with its tokenizer and ``preprocessor_config.json``).
Everything is written with ``save_pretrained`` and read back by
:func:`diffcolor.method.models.load_models` through ``from_pretrained``: exactly the path
real weights take. Nothing that loads or runs a model knows this bundle exists;
a model named ``tiny`` (:func:`diffcolor.method.model_names.resolve_model`, in
every process that names one: the command line, the flows and their workers,
the review application) stands for :func:`tiny_bundle_folder`, a copy written
once to the cache folder.

The shapes mirror Stable Diffusion 1.x where it matters to the code: the VAE
downsamples by 8 with 4 latent channels, the UNet has cross-attention blocks
named like SD's (so LoRA targets the same modules), the text encoder has 77
positions. The tokenizer is a small byte-level BPE in CLIP's format whose merges
cover the words of typical captions, colour words and the anti-colour prompts,
so those words are single tokens as they are in CLIP's real vocabulary.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from diffcolor import __version__
from diffcolor.common.cache import cache_root
from diffcolor.method.libraries import model_libraries
from diffcolor.method.models import TINY_MARKER

# Words that become single tokens in the tiny vocabulary. Real CLIP has these as
# single tokens too, which keeps token-alignment behaviour the same in tests.
TINY_WORDS = """
a an the of on in at with and or to by for from under over near beside behind
photo photograph photographs picture image portrait scene view grayscale greyscale
scratches scratchy brownish average colors colours objects faded desaturated
sepia toned sepia-toned black white gray grey red green blue yellow brown orange
purple pink violet cyan teal navy olive golden silver beige tan maroon crimson
dark light pale bright vivid colorful colourful old historic vintage
dog cat horse cow sheep bird man woman men women child children boy girl people
person family soldier soldiers uniform uniforms coat hat dress shirt suit car
cars truck bus train tram ship boat street road house houses building church
tower bridge river lake sea sky clouds tree trees grass grassland field garden
flowers flower bench wooden stone brick wall window door table chair sitting
standing walking riding posing group crowd market shop sign rocket astronaut
camera coffee cup chelsea moon city town village mountain mountains snow beach
sks
"""


def default_cache_dir() -> Path:
    """Where DiffColor keeps its own cached files (``DIFFCOLOR_CACHE`` overrides)."""
    return Path(cache_root())


def tiny_bundle_folder(cache_dir: Path | None = None) -> Path:
    """The cached tiny bundle, written on first use (atomically: a half-written one is never used)."""
    folder = (cache_dir or default_cache_dir()) / f"tiny-bundle-{__version__}"
    if (folder / TINY_MARKER).exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=folder.parent))
    try:
        write_tiny_bundle(staging)
        try:
            os.replace(staging, folder)
        except OSError:  # another process won the race: its bundle is as good as ours
            if not (folder / TINY_MARKER).exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map from bytes to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def _bpe_segments(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's greedy BPE on one word: repeatedly merge the lowest-ranked pair."""
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    while len(symbols) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2 :]
    return symbols


def build_tiny_vocab(words: list[str]) -> tuple[dict[str, int], list[str]]:
    """A CLIP-format BPE vocabulary in which each of ``words`` is a single token.

    Returns ``(vocab, merges)``: the 256 byte symbols, the same with ``</w>``,
    one token per merge, then the two special tokens, as in CLIP's ``vocab.json``.
    Each word's merges are appended after segmenting it with the merges so far,
    so greedy BPE (lowest rank first) reproduces every word as one token.
    """
    byte_symbols = list(_bytes_to_unicode().values())
    tokens = byte_symbols + [s + "</w>" for s in byte_symbols]
    known = set(tokens)
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        symbols = _bpe_segments(word, ranks)
        while len(symbols) > 1:
            merged = symbols[0] + symbols[1]
            ranks.setdefault((symbols[0], symbols[1]), len(ranks))
            if merged not in known:
                tokens.append(merged)
                known.add(merged)
            symbols = [merged] + symbols[2:]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    merges = [f"{left} {right}" for (left, right), _ in sorted(ranks.items(), key=lambda kv: kv[1])]
    return {token: index for index, token in enumerate(tokens)}, merges


def write_tiny_tokenizer(folder: Path, **special_tokens: str) -> int:
    """Writes a CLIP tokenizer over the tiny vocabulary to ``folder`` and returns its vocabulary size.

    ``special_tokens`` (``pad_token="!"`` for SD 2.x) replace CLIP's defaults;
    each must be a token of the vocabulary (a byte symbol or a special token).
    """
    model_libraries()
    from transformers import CLIPTokenizer

    vocab, merges = build_tiny_vocab(sorted(set(TINY_WORDS.split())))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), **special_tokens)
    tokenizer.model_max_length = 77
    tokenizer.save_pretrained(folder)
    return len(vocab)


def write_tiny_bundle(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Writes the tiny random bundle to ``folder`` (created; existing files replaced).

    Returns the folder. Needs no network; takes a few seconds on a CPU.
    """
    model_libraries()
    from transformers import CLIPTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    # Importing the SD pipeline class warns that CLIP's image processor wants
    # torchvision; the bundle needs neither, so keep the output clean.
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        from diffusers import PNDMScheduler, StableDiffusionPipeline
    finally:
        transformers_logging.set_verbosity(verbosity)

    # 1. Tokenizer shared by the text encoder and CLIP (as SD 1.x shares CLIP's).
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    vocab_size = write_tiny_tokenizer(root / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")

    # 2. UNet, VAE, text encoder and CLIP with random weights from ``seed``.
    unet, vae, text_encoder, clip = _random_modules(tokenizer, vocab_size, seed)
    scheduler = PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )

    # 3. Save in the diffusers and transformers layouts, and say what the weights are.
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(root, safe_serialization=True)
    write_clip_folder(root / "clip", clip, tokenizer)
    (root / TINY_MARKER).write_text(
        "Random weights for tests and smoke runs only. Outputs are noise-coloured, not colourisations.\n",
        encoding="utf-8",
    )
    return root


def _random_modules(tokenizer, vocab_size: int, seed: int) -> tuple:
    """UNet, VAE, text encoder and CLIP at toy width, with SD's structure, drawn from ``seed``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPModel, CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        # 1. UNet: two resolutions, cross-attention in both, SD's module names.
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=1,
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        # 2. VAE: four blocks, so it downsamples by 8 like SD's.
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=64,
            scaling_factor=0.18215,
        )
        # 3. Text encoder with SD's 77 positions.
        text_config = CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        text_encoder = CLIPTextModel(text_config)
        # 4. CLIP for the contrastive loss and the CLIP score.
        clip = CLIPModel(tiny_clip_config(text_config))
    return unet, vae, text_encoder, clip


def tiny_clip_config(text_config):
    """A toy CLIP config around ``text_config`` (a ``CLIPTextConfig``): 32 px images, 16-d projections."""
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=text_config.to_dict(),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )


def write_clip_folder(folder: Path, clip, tokenizer) -> None:
    """CLIP in the transformers layout, with its tokenizer and a preprocessor config for 32 px inputs."""
    clip.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "CLIPImageProcessor",
                "do_resize": True,
                "size": {"shortest_edge": 32},
                "do_center_crop": True,
                "crop_size": {"height": 32, "width": 32},
                "do_normalize": True,
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
                "resample": 3,
            },
            indent=2,
        ),
        encoding="utf-8",
    )
