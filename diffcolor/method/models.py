"""Loading the Stable Diffusion bundle and the CLIP model, offline by default.

A model is named by a local folder in the diffusers layout or a Hugging Face
hub id (with an optional pinned revision). Every name is first resolved to a
local folder; then each component is loaded from that folder with
``from_pretrained``, the same path for real and random weights (the tiny
bundle of :mod:`diffcolor.method.tiny`, which the name ``tiny`` stands for
(:mod:`diffcolor.method.model_names`), and the random bundles of
:mod:`diffcolor.tools` are folders like any other). The network is only used when the caller
allows downloads; otherwise a missing model is a :class:`ModelNotFoundError`
with one line saying what is missing and how to get it, raised before any item
is touched.

The sha256 of every weight file that is loaded goes into provenance.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from diffcolor.common.captions import PromptLimit
from diffcolor.common.errors import ModelNotFoundError
from diffcolor.method.libraries import MODEL_BUILD_LOCK, model_libraries

DEFAULT_CLIP = "openai/clip-vit-large-patch14"  # ours: CLIP ViT-L/14, the family of SD 1.x's text encoder
# A bundle holding this file declares random weights: its outputs are labelled smoke runs, not colourisations.
TINY_MARKER = "TINY_RANDOM_BUNDLE.txt"
SD_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
WEIGHT_SUFFIXES = (".safetensors",)
# Weight files in a pickle-based format: loading one can run code, so DiffColor refuses them (docs/DESIGN.md §9).
PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_VARIANT_INFIXES = (".fp16.", ".bf16.", ".non_ema.", ".ema.")


@dataclass
class Models:
    """Everything the method needs, loaded once per worker and reused across items."""

    model_id: str  # as the user named it: a folder, a hub id, or "tiny"
    clip_id: str
    folder: Path  # the resolved local folder of the SD bundle
    clip_folder: Path
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler_config: dict  # the bundle's scheduler config; stages build their schedulers from it
    clip: torch.nn.Module
    clip_tokenizer: object
    clip_image_size: int  # CLIP's input side, pixels
    clip_mean: tuple[float, float, float]
    clip_std: tuple[float, float, float]
    device: torch.device
    weight_sha256: dict[str, str] = field(default_factory=dict)  # "component/file" -> sha256
    model_hash: str = ""  # sha256 over weight hashes and component configs
    random_weights: bool = False  # True for the tiny bundle: outputs are a smoke run, not colourisations
    # Storage of the frozen linear/convolution weights: bf16 on CUDA by default (diffcolor.method.performance), else fp32.
    weight_dtype: torch.dtype = torch.float32

    @property
    def vae_scale_factor(self) -> int:
        """How many pixels one latent cell covers along a side (8 for SD)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_side(self) -> int:
        """The side, in pixels, the UNet was trained at: its ``sample_size`` (latent cells) x the VAE factor.

        512 for SD 1.x and 2.x-base, 768 for SD 2.x (768-v, ``sample_size`` 96).
        """
        return native_side(self.unet.config.sample_size, self.vae_scale_factor)

    def working_pixels(self, configured: int | None) -> int:
        """The pixel count the model sees: ``configured`` (a preset's ``model_pixels``), else the native side squared."""
        return int(configured) if configured else self.native_side ** 2

    @property
    def provenance(self) -> dict:
        """Model ids and hashes as they go into result records and image metadata."""
        return {
            "model_id": self.model_id,
            "clip_model_id": self.clip_id,
            "model_hash": self.model_hash,
            "weight_sha256": dict(self.weight_sha256),
            "random_weights": self.random_weights,
            "weight_dtype": str(self.weight_dtype).removeprefix("torch."),
        }


def native_side(sample_size, vae_scale_factor: int) -> int:
    """A UNet's training side in pixels from its config's ``sample_size`` (an int, or [h, w]: the larger)."""
    if isinstance(sample_size, (list, tuple)):
        sample_size = max(sample_size)
    return int(sample_size) * int(vae_scale_factor)


def resolve_folder(name: str, *, revision: str | None, allow_download: bool, what: str, check: str) -> Path:
    """Turns a folder path or hub id into a local folder containing ``check``, or raises."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / check).exists():
            raise ModelNotFoundError(f"{what} folder '{name}' has no {check}: it is not a {what} in the expected layout")
        return path
    if not _HUB_ID.match(name) or name.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"{what} folder '{name}' does not exist")
    from huggingface_hub import snapshot_download

    try:
        folder = Path(
            snapshot_download(
                name,
                revision=revision,
                local_files_only=not allow_download,
                allow_patterns=["*.json", "*.txt", "*.safetensors", "*.model"],
            )
        )
    except Exception as error:  # the hub raises several classes for "not available offline"
        hint = (
            f"download it once with `hf download {name}` on a connected machine and copy the cache, "
            "point at a local folder, or pass --allow-download"
        )
        if allow_download:
            hint = f"the download failed ({type(error).__name__})"
        raise ModelNotFoundError(f"{what} '{name}' is not available locally: {hint}") from None
    if not (folder / check).exists():
        raise ModelNotFoundError(f"{what} '{name}' has no {check}: it is not a {what} in the expected layout")
    return folder


@lru_cache(maxsize=256)
def _sha256_file(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    """sha256 of a file, cached per (path, size, mtime) within the process."""
    stat = path.stat()
    return _sha256_file(str(path), stat.st_size, stat.st_mtime_ns)


def _hash_components(folders: dict[str, Path]) -> tuple[dict[str, str], str]:
    """Per-file sha256 of the default-variant weight files, and one hash over them and the configs."""
    weights: dict[str, str] = {}
    combined = hashlib.sha256()
    for label, folder in sorted(folders.items()):
        for path in sorted(folder.iterdir()):
            if not path.is_file():
                continue
            if path.suffix == ".json":
                combined.update(f"{label}/{path.name}".encode())
                combined.update(path.read_bytes())
            elif path.name.endswith(WEIGHT_SUFFIXES) and not any(v in path.name for v in _VARIANT_INFIXES):
                weights[f"{label}/{path.name}"] = sha256_file(path)
    for key, value in sorted(weights.items()):
        combined.update(f"{key}={value}".encode())
    return weights, combined.hexdigest()


def _read_clip_preprocessing(folder: Path) -> tuple[int, tuple, tuple]:
    """CLIP's input size, mean and std from its preprocessor config (no torchvision needed)."""
    config_path = folder / "preprocessor_config.json"
    if not config_path.exists():
        raise ModelNotFoundError(f"CLIP folder '{folder}' has no preprocessor_config.json")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    crop = config.get("crop_size", 224)
    size = crop.get("height", 224) if isinstance(crop, dict) else int(crop)
    return int(size), tuple(config["image_mean"]), tuple(config["image_std"])


def _check_safetensors(folder: Path, what: str) -> None:
    """Refuses a component whose weights are pickled (``.bin``, ``.ckpt``, ...) rather than safetensors."""
    files = [path.name for path in folder.iterdir() if path.is_file()]
    pickled = sorted(name for name in files if name.endswith(PICKLED_SUFFIXES))
    if pickled and not any(name.endswith(".safetensors") for name in files):
        raise ModelNotFoundError(
            f"{what}: {folder.name}/{pickled[0]} is a pickled weight file, which DiffColor never loads (it can run "
            "code); convert the model to safetensors (diffusers: save_pretrained(..., safe_serialization=True))")


def resolve_bundle(model: str, clip: str | None, revision: str | None, clip_revision: str | None,
                   allow_download: bool) -> tuple[Path, str | None, Path]:
    """Local folders of the SD bundle and of CLIP (and CLIP's name, None for the bundle's own), or ModelNotFoundError."""
    folder = resolve_folder(model, revision=revision, allow_download=allow_download, what="Stable Diffusion model",
                            check="unet/config.json")
    for component in SD_COMPONENTS:
        if not (folder / component).is_dir():
            raise ModelNotFoundError(f"Stable Diffusion model '{model}' has no {component}/ folder")
    for component in ("unet", "vae", "text_encoder"):
        _check_safetensors(folder / component, f"Stable Diffusion model '{model}'")
    if clip is None and (folder / "clip" / "config.json").exists():
        _check_safetensors(folder / "clip", f"Stable Diffusion model '{model}'")
        return folder, None, folder / "clip"
    clip = clip or DEFAULT_CLIP
    clip_folder = resolve_folder(clip, revision=clip_revision, allow_download=allow_download, what="CLIP model", check="config.json")
    _check_safetensors(clip_folder, f"CLIP model '{clip}'")
    return folder, clip, clip_folder


def _hash_bundle(folder: Path, clip_folder: Path) -> tuple[dict[str, str], str]:
    return _hash_components(
        {"unet": folder / "unet", "vae": folder / "vae", "text_encoder": folder / "text_encoder", "clip": clip_folder}
    )


def resolve_model_hash(model: str, *, clip: str | None = None, revision: str | None = None,
                       clip_revision: str | None = None, allow_download: bool = False) -> str:
    """The ``model_hash`` that :func:`load_models` would report, without loading any weights.

    Orchestrators use it to plan (cache keys) without holding models themselves.
    """
    folder, _, clip_folder = resolve_bundle(model, clip, revision, clip_revision, allow_download)
    return _hash_bundle(folder, clip_folder)[1]


def prompt_limit(tokenizer) -> PromptLimit:
    """The :class:`~diffcolor.common.captions.PromptLimit` of a CLIP tokenizer: its BPE pieces, 2 fewer than its length."""
    # Measuring a long prompt is the point here: transformers' warning that it is longer than the model reads is not.
    getattr(tokenizer, "deprecation_warnings", {})["sequence-length-is-longer-than-the-specified-maximum"] = True
    return PromptLimit(tokenize=tokenizer.tokenize, limit=int(tokenizer.model_max_length) - 2,
                       model_max_length=int(tokenizer.model_max_length))


def load_prompt_limit(model: str, *, revision: str | None = None, allow_download: bool = False):
    """The :class:`~diffcolor.common.captions.PromptLimit` of ``model``'s tokenizer, loading no weights.

    What ``manifest validate --model`` and the doctor check prompts with;
    raises :class:`ModelNotFoundError` as :func:`load_models` would.
    """
    model_libraries()
    from transformers import CLIPTokenizer

    folder = resolve_folder(model, revision=revision, allow_download=allow_download, what="Stable Diffusion model",
                            check="tokenizer")
    return prompt_limit(CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"))


def load_models(
    model: str,
    *,
    clip: str | None = None,
    revision: str | None = None,
    clip_revision: str | None = None,
    device: str | torch.device = "cpu",
    allow_download: bool = False,
    weight_dtype: str = "auto",
    model_id: str | None = None,
) -> Models:
    """Loads the SD bundle and CLIP, frozen and in eval mode, onto ``device``.

    ``model`` is a folder or a hub id; ``model_id`` is the name that goes into
    provenance (default: ``model``; the command line's ``tiny`` passes its own
    name for the cached folder). ``clip`` defaults to the bundle's ``clip/``
    subfolder when it has one (named ``MODEL_ID/clip``), else
    :data:`DEFAULT_CLIP`. ``weight_dtype`` stores the frozen linear and
    convolution weights in bf16 ("bf16"; "auto": on CUDA) or fp32 (see
    :mod:`diffcolor.method.performance`). Raises :class:`ModelNotFoundError`
    (one line, no network touched unless ``allow_download``) when anything is
    missing, ValueError for a bad ``weight_dtype``.
    """
    from diffcolor.method.performance import frozen_weight_dtype, store_frozen_weights

    device = torch.device(device)
    storage_dtype = frozen_weight_dtype(weight_dtype, device)
    model_id = model_id or model

    # 1. Resolve every name to a local folder before loading anything.
    folder, clip, clip_folder = resolve_bundle(model, clip, revision, clip_revision, allow_download)

    # 2. Load through from_pretrained, the same path for real and random weights.
    components = _load_components(folder, clip_folder)

    # 3. Freeze: only adapters or embeddings created by the stages ever train. Store the matrix weights
    #    in their compute dtype before the move (half the bytes to copy when it is bf16).
    for name in ("unet", "vae", "text_encoder", "clip"):
        module = components[name]
        module.requires_grad_(False)
        module.eval()
        store_frozen_weights([module], storage_dtype)
        module.to(device)

    # 4. Provenance: hashes of exactly the files loaded.
    weights, model_hash = _hash_bundle(folder, clip_folder)
    return Models(
        model_id=model_id,
        clip_id=clip or f"{model_id}/clip",
        folder=folder,
        clip_folder=clip_folder,
        device=device,
        weight_sha256=weights,
        model_hash=model_hash,
        random_weights=(folder / TINY_MARKER).exists(),
        weight_dtype=storage_dtype,
        **components,
    )


def _load_components(folder: Path, clip_folder: Path) -> dict:
    """Every component of the bundle and of CLIP, loaded with ``from_pretrained`` (CPU, fp32, as saved)."""
    model_libraries()
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # one bar per component is noise in batch logs
    clip_size, clip_mean, clip_std = _read_clip_preprocessing(clip_folder)
    # Every component in fp32 whatever its config or files say (transformers 5 would otherwise load a text encoder
    # whose config names float16 in float16, norms and embeddings included, and the first fp32 layer norm fails);
    # load_models then stores the frozen matrix weights in the device's dtype itself.
    fp32 = torch.float32
    with MODEL_BUILD_LOCK:  # one build at a time in a process (see diffcolor.method.libraries)
        return _from_pretrained(folder, clip_folder, fp32, clip_size, clip_mean, clip_std)


def _from_pretrained(folder: Path, clip_folder: Path, fp32: torch.dtype, clip_size: int, clip_mean, clip_std) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer

    return {
        "unet": UNet2DConditionModel.from_pretrained(folder, subfolder="unet", use_safetensors=True, torch_dtype=fp32),
        "vae": AutoencoderKL.from_pretrained(folder, subfolder="vae", use_safetensors=True, torch_dtype=fp32),
        "text_encoder": CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", use_safetensors=True, dtype=fp32),
        "tokenizer": CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
        "scheduler_config": json.loads((folder / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8")),
        "clip": CLIPModel.from_pretrained(clip_folder, use_safetensors=True, dtype=fp32),
        "clip_tokenizer": CLIPTokenizer.from_pretrained(clip_folder),
        "clip_image_size": clip_size,
        "clip_mean": clip_mean,
        "clip_std": clip_std,
    }
