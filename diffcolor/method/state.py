"""The item's colour state: what a new-prompt render needs, as tensors and as bytes, nothing pickled.

A colour state is one safetensors object holding the tensors (``e_opt``, the
trained adapter, the gray image at model resolution, the aligned primary
colourisation and its confidence) and, in its header's metadata under
``diffcolor``, the JSON description (captions, identifier slots, seed,
configuration, model hashes, software version). This module turns a
:class:`ColorState` into those bytes and back; where the bytes are stored is
the archive's business (:mod:`diffcolor.archive.states`).
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
from diffcolor.common.tensorfiles import DESCRIPTION_KEY, read_description
from diffcolor.method.training import AdapterConfig

STATE_FORMAT = 1


@dataclass
class ColorState:
    """An item's stored colour state (spec section 3, stage 2)."""

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

    def describe(self) -> dict:
        """The JSON part of the state."""
        return {
            "format": STATE_FORMAT,
            "caption": self.rewritten.caption,
            "rewritten_caption": self.rewritten.text,
            "identifier": self.rewritten.identifier,
            "slots": list(self.rewritten.slots),
            "adapter": {"mode": self.adapter_config.mode, "rank": self.adapter_config.rank,
                        "alpha": self.adapter_config.alpha, "targets": list(self.adapter_config.targets)},
            "seed": self.seed,
            "model_hash": self.model_hash,
            "config": self.config,
            "software_version": self.software_version,
        }


def state_to_bytes(state: ColorState) -> bytes:
    """The colour state as one safetensors object (tensors in fp32 or as trained, description in the header)."""
    tensors = {
        "embedding": state.embedding.float().contiguous(),
        "gray": state.gray.float().contiguous(),
        "primary": state.primary.float().contiguous(),
        "confidence": state.confidence.float().contiguous(),
    }
    tensors.update({f"adapter.{key}": value.contiguous() for key, value in state.adapter.items()})
    return save_safetensors(tensors, metadata={DESCRIPTION_KEY: json.dumps(state.describe())})


def state_from_bytes(data: bytes, name: str) -> ColorState:
    """The colour state in ``data`` (read from ``name``, which errors name).

    Raises StateError when the bytes are not a colour state of this format,
    or their description lacks a field.
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
        )
    except (KeyError, TypeError, ValueError) as error:
        raise StateError(f"colour state '{name}' is incomplete: {type(error).__name__} {error}") from None
