"""The item's colour state: what a new-prompt render needs, as tensors and as bytes, nothing pickled.

A colour state is one safetensors object holding the tensors (``e_opt``, the
trained adapter, the gray image at model resolution, the aligned primary
colourisation and its confidence) and, in its header's metadata under
``diffcolor``, the JSON description (captions, identifier slots, seed,
configuration, model hashes, software version, and the manifest below). This
module turns a :class:`ColorState` into those bytes and back; where the bytes
are stored is the archive's business (:mod:`diffcolor.archive.states`).

A LoRA-mode state's adapter is also exported as a diffusers LoRA weights file
(:func:`diffusers_lora_bytes`), so that Stable Diffusion tools other than this
package can use it: ``pipeline.load_lora_weights(folder)`` on the same base
model loads it. The file is what diffusers' own
``StableDiffusionLoraLoaderMixin.save_lora_weights(folder, unet_lora_layers=...,
unet_lora_adapter_metadata=...)`` writes (``pytorch_lora_weights.safetensors``),
up to the order of the header's metadata keys:

- tensors ``unet.<module path>.lora_A.weight`` / ``.lora_B.weight`` (peft's
  names, prefixed with the pipeline component), fp32 as trained;
- header metadata ``format: pt`` and ``lora_adapter_metadata``, the JSON of
  ``{"unet.r": rank, "unet.lora_alpha": alpha, "unet.target_modules": [...]}``,
  from which diffusers' loader builds the peft ``LoraConfig``: so the scale
  ``alpha / rank`` comes out right also when alpha differs from the rank (a
  loader that ignores the metadata would take alpha = rank). Only these
  fields, not peft's whole ``LoraConfig.to_dict()``, so a reader's peft need
  not know a newer peft's fields. The targets are sorted and the header's
  metadata keys put in order, so the same state gives the same bytes in every
  call and process (safetensors itself orders metadata keys at random).

The description's ``manifest`` block says what a reader of the state needs
outside this package:

- ``base_model``: the base model as it was named (``id``; None in states made
  before the manifest) and its ``hash`` (:attr:`Models.model_hash`), which the
  adapter and embedding belong to;
- ``adapter``: its ``layout``, ``diffusers-lora`` (the LoRA file at ``path``,
  relative to the state object's folder, with its ``sha256`` and size) or
  ``full-unet`` (a full fine-tune: the whole UNet's tensors are in the state
  object under ``adapter.<parameter name>``, and no LoRA file is written), and
  ``rank``, ``alpha``, ``targets``;
- ``usage``: the embedding ``e_opt`` is the state object's tensor
  ``embedding``; a render gives the UNet ``alpha * encode(target) + (1 -
  alpha) * embedding`` as the prompt embedding and ``encode("")`` as the
  negative one, with the render settings the state was made with (``alpha``,
  the interpolation weight; DDIM with ``ddim_eta`` 0) and the number of
  denoising steps they run. States written before the rename name alpha
  ``eta`` in their stored configuration; they read as alpha.

States written before the manifest load as before (the format stays 1); their
``base_model_id`` is None.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from diffcolor import __version__
from diffcolor.common.captions import RewrittenCaption
from diffcolor.common.errors import StateError
from diffcolor.common.keys import sha256_hex
from diffcolor.common.tensorfiles import (
    DESCRIPTION_KEY,
    HEADER_LENGTH_BYTES,
    read_description,
    read_header,
)
from diffcolor.method.diffusion import denoising_steps
from diffcolor.method.training import AdapterConfig, peft_lora_key

STATE_FORMAT = 1
LORA_LAYOUT = "diffusers-lora"  # the adapter is also a diffusers LoRA weights file
FULL_LAYOUT = "full-unet"  # a full fine-tune: the UNet's tensors are in the state object only
# The LoRA file, relative to the state object's folder. Its name is the one diffusers' load_lora_weights
# looks for in a folder (and save_lora_weights writes), so the folder alone loads it.
LORA_PATH = "lora/pytorch_lora_weights.safetensors"
LORA_COMPONENT = "unet"  # diffusers' prefix of a UNet LoRA's keys and metadata (StableDiffusionLoraLoaderMixin.unet_name)


@dataclass
class ColorState:
    """An item's stored colour state (docs/DESIGN.md §3.4)."""

    embedding: torch.Tensor  # e_opt, (1, 77, D)
    adapter: dict[str, torch.Tensor]  # trained UNet tensors (LoRA, or the full UNet)
    adapter_config: AdapterConfig
    gray: torch.Tensor  # (1, 1, h, w) the gray image at model resolution, [0, 1]
    primary: torch.Tensor  # (1, 3, h, w) aligned primary colourisation, [0, 1]
    confidence: torch.Tensor  # (1, 1, h, w) alignment confidence of the primary
    rewritten: RewrittenCaption
    seed: int
    model_hash: str
    config: dict = field(default_factory=dict)  # the pipeline configuration that made it
    software_version: str = __version__
    base_model_id: str | None = None  # the base model as named (Models.model_id); None in states before the manifest

    def describe(self) -> dict:
        """The JSON part of the state, with its manifest (which names the LoRA file's sha256)."""
        return _describe(self, diffusers_lora_bytes(self))


def _describe(state: ColorState, lora: bytes | None) -> dict:
    config = state.adapter_config
    return {
        "format": STATE_FORMAT,
        "caption": state.rewritten.caption,
        "rewritten_caption": state.rewritten.text,
        "identifier": state.rewritten.identifier,
        "slots": list(state.rewritten.slots),
        "adapter": {"mode": config.mode, "rank": config.rank, "alpha": config.alpha, "targets": list(config.targets)},
        "seed": state.seed,
        "model_hash": state.model_hash,
        "config": state.config,
        "software_version": state.software_version,
        "manifest": state_manifest(state, lora),
    }


def diffusers_lora_bytes(state: ColorState) -> bytes | None:
    """The state's adapter as a diffusers LoRA weights file (see the module docstring); None for a full fine-tune.

    Deterministic: the same state gives the same bytes. Raises StateError for
    a LoRA-mode state without adapter tensors or with a tensor that is not a
    LoRA matrix.
    """
    config = state.adapter_config
    if config.mode == "full":
        return None
    if config.mode != "lora":
        raise StateError(f"colour state adapter mode must be 'lora' or 'full', got {config.mode!r}")
    if not state.adapter:
        raise StateError("colour state in LoRA mode has no adapter tensors to export")
    tensors = {f"{LORA_COMPONENT}.{peft_lora_key(key)}": value.contiguous() for key, value in state.adapter.items()}
    peft_config = {"r": config.rank, "lora_alpha": config.alpha, "target_modules": sorted(config.targets)}
    # As diffusers' write_lora_layers: the component-prefixed metadata, indent 2, keys sorted.
    metadata = json.dumps({f"{LORA_COMPONENT}.{key}": value for key, value in peft_config.items()},
                          indent=2, sort_keys=True)
    return _with_sorted_metadata(save_safetensors(tensors, metadata={"format": "pt", "lora_adapter_metadata": metadata}))


def _with_sorted_metadata(data: bytes) -> bytes:
    """The safetensors bytes ``data`` with their header's metadata keys in sorted order.

    safetensors keeps the metadata in a hash map, so with two keys their order
    in the header, hence the file's sha256, changes from call to call; the
    state's manifest names its LoRA by that sha256. Only the order changes, so
    the header keeps its length and the tensors their offsets.
    """
    header = read_header(data)
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    length = int.from_bytes(data[:HEADER_LENGTH_BYTES], "little")
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    original = data[HEADER_LENGTH_BYTES : HEADER_LENGTH_BYTES + length]
    if len(text) != len(original.rstrip(b" ")):  # safetensors pads its header with spaces
        raise StateError("the LoRA file's safetensors header could not be put in a stable order")
    return data[:HEADER_LENGTH_BYTES] + text.ljust(length, b" ") + data[HEADER_LENGTH_BYTES + length :]


def state_manifest(state: ColorState, lora: bytes | None) -> dict:
    """The description's ``manifest`` block (see the module docstring) for ``state`` and its LoRA file ``lora``."""
    config = state.adapter_config
    render = state.config.get("render") or {}
    adapter = {"layout": LORA_LAYOUT if lora is not None else FULL_LAYOUT,
               "path": LORA_PATH if lora is not None else None,
               "sha256": sha256_hex(lora) if lora is not None else None,
               "bytes": len(lora) if lora is not None else None,
               "rank": config.rank, "alpha": config.alpha, "targets": list(config.targets)}
    return {
        "base_model": {"id": state.base_model_id, "hash": state.model_hash},
        "adapter": adapter,
        "usage": {
            "embedding": "embedding",  # the state object's tensor e_opt, (1, 77, D)
            "prompt_embeds": "alpha * encode(target) + (1 - alpha) * embedding",
            "negative_prompt_embeds": 'encode("")',
            "alpha": render.get("alpha", render.get("eta")),  # "eta" in configurations stored before the rename
            "ddim_eta": 0.0,  # DDIM's own eta: deterministic sampling
            "steps": render.get("steps"),
            "guidance": render.get("guidance"),
            "strength": render.get("strength"),
            # The DDIM steps a render runs: int(steps * strength), as diffusers' img2img counts them.
            "denoising_steps": _denoising_steps(render),
            "scheduler": "DDIMScheduler, eta 0, from the base model's scheduler config with clip_sample off, "
                         "steps_offset 1 (diffcolor.method.diffusion.build_sampling_scheduler)",
        },
    }


def _denoising_steps(render: dict) -> int | None:
    """The DDIM steps of a stored render configuration, None where it has none (or none that runs)."""
    try:
        return denoising_steps(render["steps"], render["strength"])
    except (KeyError, TypeError, ValueError):
        return None


def export_state(state: ColorState) -> tuple[bytes, bytes | None]:
    """The state object's bytes and its diffusers LoRA file's bytes (None for a full fine-tune).

    The state's manifest names the LoRA file's sha256, so a LoRA that is not
    this state's is detectable (:func:`diffcolor.archive.states.read_state_lora`).
    """
    lora = diffusers_lora_bytes(state)
    return _state_bytes(state, _describe(state, lora)), lora


def state_to_bytes(state: ColorState) -> bytes:
    """The colour state as one safetensors object (tensors in fp32 or as trained, description in the header)."""
    return _state_bytes(state, state.describe())


def _state_bytes(state: ColorState, description: dict) -> bytes:
    tensors = {
        "embedding": state.embedding.float().contiguous(),
        "gray": state.gray.float().contiguous(),
        "primary": state.primary.float().contiguous(),
        "confidence": state.confidence.float().contiguous(),
    }
    tensors.update({f"adapter.{key}": value.contiguous() for key, value in state.adapter.items()})
    return save_safetensors(tensors, metadata={DESCRIPTION_KEY: json.dumps(description)})


def state_from_bytes(data: bytes, name: str) -> ColorState:
    """The colour state in ``data`` (read from ``name``, which errors name).

    Raises StateError when the bytes are not a colour state of this format,
    or their description lacks a field. A description without a manifest (a
    state made before it) loads, with ``base_model_id`` None.
    """
    # 1. Tensors and description; safetensors raises several classes on a corrupt file.
    try:
        tensors = load_safetensors(data)
        meta = read_description(data)
    except Exception as error:
        raise StateError(f"colour state '{name}' is unreadable: {error}") from error
    if meta.get("format") != STATE_FORMAT:
        raise StateError(f"colour state '{name}' has format {meta.get('format')!r}, expected {STATE_FORMAT}")

    # 2. The state; a description or tensor missing is a named error, not a KeyError.
    try:
        adapter = meta["adapter"]
        return ColorState(
            embedding=tensors["embedding"],
            adapter={key[len("adapter."):]: value for key, value in tensors.items() if key.startswith("adapter.")},
            adapter_config=AdapterConfig(mode=adapter["mode"], rank=adapter["rank"], alpha=adapter["alpha"],
                                         targets=tuple(adapter["targets"])),
            gray=tensors["gray"],
            primary=tensors["primary"],
            confidence=tensors["confidence"],
            rewritten=RewrittenCaption(caption=meta["caption"], text=meta["rewritten_caption"],
                                       identifier=meta["identifier"], slots=tuple(meta["slots"])),
            seed=int(meta["seed"]),
            model_hash=meta["model_hash"],
            config=meta["config"],
            software_version=meta["software_version"],
            base_model_id=_manifest_base_model_id(meta),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise StateError(f"colour state '{name}' is incomplete: {type(error).__name__} {error}") from None


def _manifest_base_model_id(meta: dict) -> str | None:
    """The base model's id the manifest names; None for a state made before the manifest."""
    manifest = meta.get("manifest")
    if manifest is None:
        return None
    base_model = manifest["base_model"]  # a manifest without it is incomplete (a KeyError, named above)
    return None if base_model["id"] is None else str(base_model["id"])
