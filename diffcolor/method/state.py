"""The item's colour state: what a new-prompt render needs, and nothing pickled.

A colour state is one safetensors object (``color-state.safetensors``) holding
the tensors (``e_opt``, the trained adapter, the gray image at model
resolution, the aligned primary colourisation and its confidence) and, in its
header's metadata, the JSON description (captions, identifier slots, seed,
configuration, model hashes, software version). Being one object it is
published atomically; ``state.json`` beside it is a readable copy of the
description for people and tools.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from diffcolor import __version__
from diffcolor.archive import storage
from diffcolor.common.errors import InputUnavailableError, StateError
from diffcolor.method.stage2 import RewrittenCaption
from diffcolor.method.training import AdapterConfig

STATE_FILE = "color-state.safetensors"
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


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The string metadata of a safetensors object, read from its JSON header alone."""
    header_length = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + header_length]).get("__metadata__", {})


def save_state(state: ColorState, prefix: str) -> str:
    """Publishes ``state`` under the storage prefix ``prefix``; returns the state object's URI."""
    tensors = {
        "embedding": state.embedding.float().contiguous(),
        "gray": state.gray.float().contiguous(),
        "primary": state.primary.float().contiguous(),
        "confidence": state.confidence.float().contiguous(),
    }
    tensors.update({f"adapter.{key}": value.contiguous() for key, value in state.adapter.items()})
    description = state.describe()
    uri = storage.join(prefix, STATE_FILE)
    storage.write_bytes(uri, save_safetensors(tensors, metadata={"diffcolor": json.dumps(description)}))
    storage.write_json(storage.join(prefix, "state.json"), description)
    return uri


def load_state(prefix: str) -> ColorState:
    """Reads the colour state under ``prefix``. Raises StateError when missing or unreadable."""
    uri = storage.join(prefix, STATE_FILE)
    try:
        data = storage.read_bytes(uri)
    except InputUnavailableError as error:
        raise StateError(f"no colour state at '{uri}'") from error
    try:
        tensors = load_safetensors(data)
        meta = json.loads(safetensors_metadata(data)["diffcolor"])
    except Exception as error:  # safetensors raises several classes on a corrupt file
        raise StateError(f"colour state '{uri}' is unreadable: {error}") from error
    if meta.get("format") != STATE_FORMAT:
        raise StateError(f"colour state '{uri}' has format {meta.get('format')!r}, expected {STATE_FORMAT}")
    adapter = meta["adapter"]
    return ColorState(
        embedding=tensors["embedding"],
        adapter={key[len("adapter."):]: value for key, value in tensors.items() if key.startswith("adapter.")},
        adapter_config=AdapterConfig(mode=adapter["mode"], rank=adapter["rank"], alpha=adapter["alpha"], targets=tuple(adapter["targets"])),
        gray=tensors["gray"],
        primary=tensors["primary"],
        confidence=tensors["confidence"],
        rewritten=RewrittenCaption(caption=meta["caption"], text=meta["rewritten_caption"], identifier=meta["identifier"], slots=tuple(meta["slots"])),
        seed=int(meta["seed"]),
        model_hash=meta["model_hash"],
        config=meta["config"],
        software_version=meta["software_version"],
    )
