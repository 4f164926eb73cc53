"""The whole pipeline's configuration and the named presets (spec section 10).

``smoke`` runs in seconds on a CPU with the tiny bundle (tests, CI, smoke runs);
``default`` is a sensible production recipe; ``paper-scale`` is recipe R of spec
section 8 (stage 1 500 iterations, embedding 500 steps, fine-tune 1000 steps,
50 DDIM render steps) at 512x512.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field, replace

from diffcolor.method.align import AlignConfig
from diffcolor.method.merge import MergeConfig
from diffcolor.method.render import RenderConfig
from diffcolor.method.stage1 import Stage1Config
from diffcolor.method.stage2 import Stage2Config
from diffcolor.method.training import CheckpointPolicy


@dataclass(frozen=True)
class PipelineConfig:
    """Everything that decides an item's pixels (it is part of the item's cache key)."""

    model_pixels: int = 512 * 512  # spec: the model sees about 512x512, aspect kept
    stage1: Stage1Config = field(default_factory=Stage1Config)
    align: AlignConfig = field(default_factory=AlignConfig)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    render: RenderConfig = field(default_factory=RenderConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    access_format: str = "JPEG"  # access copy: "JPEG" or "PNG"
    access_max_side: int | None = 2048  # ours: access copies are for screens; None keeps full size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PipelineConfig":
        return _from_dict(cls, data)


def _from_dict(kind, data):
    """Rebuilds nested frozen dataclasses (and their tuples) from ``asdict`` output."""
    if dataclasses.is_dataclass(kind) and isinstance(data, dict):
        hints = typing.get_type_hints(kind)
        known = {f.name for f in dataclasses.fields(kind)}
        return kind(**{key: _from_dict(hints[key], value) for key, value in data.items() if key in known})
    if isinstance(data, list):
        return tuple(data)
    return data


def _checkpoints(every: int) -> CheckpointPolicy:
    return CheckpointPolicy(every=every, keep=2)


PRESETS: dict[str, PipelineConfig] = {
    "smoke": PipelineConfig(
        model_pixels=64 * 64,
        stage1=Stage1Config(steps=4, primary_steps=4, checkpoints=_checkpoints(2)),
        align=AlignConfig(window_radius=2),
        stage2=Stage2Config(embed_steps=4, finetune_steps=4, checkpoints=_checkpoints(2)),
        render=RenderConfig(steps=4),
        access_max_side=512,
    ),
    "default": PipelineConfig(
        stage1=Stage1Config(steps=300, checkpoints=_checkpoints(50)),
        stage2=Stage2Config(embed_steps=300, finetune_steps=600, checkpoints=_checkpoints(100)),
        render=RenderConfig(steps=30),
    ),
    "paper-scale": PipelineConfig(
        stage1=Stage1Config(steps=500, checkpoints=_checkpoints(100)),
        stage2=Stage2Config(embed_steps=500, finetune_steps=1000, checkpoints=_checkpoints(100)),
        render=RenderConfig(steps=50),
    ),
}


def apply_overrides(config: PipelineConfig, overrides: dict[str, object]) -> PipelineConfig:
    """``config`` with dotted fields replaced, e.g. ``{"stage1.steps": 200, "render.eta": 0.8}``.

    Raises ValueError naming an unknown field.
    """
    for dotted, value in overrides.items():
        path = dotted.split(".")
        parents = [config]
        for name in path[:-1]:
            if not dataclasses.is_dataclass(parents[-1]) or name not in {f.name for f in dataclasses.fields(parents[-1])}:
                raise ValueError(f"unknown configuration field {dotted!r}")
            parents.append(getattr(parents[-1], name))
        if not dataclasses.is_dataclass(parents[-1]) or path[-1] not in {f.name for f in dataclasses.fields(parents[-1])}:
            raise ValueError(f"unknown configuration field {dotted!r}")
        current = getattr(parents[-1], path[-1])
        if isinstance(current, tuple) and isinstance(value, list):
            value = tuple(value)
        updated = replace(parents[-1], **{path[-1]: value})
        for parent, name in zip(reversed(parents[:-1]), reversed(path[:-1])):
            updated = replace(parent, **{name: updated})
        config = updated
    return config


def get_preset(name: str) -> PipelineConfig:
    """The named preset; raises ValueError naming the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None


__all__ = ["PRESETS", "PipelineConfig", "apply_overrides", "get_preset", "replace"]
