"""The whole pipeline's configuration and the named presets (docs/DESIGN.md §10.2).

``smoke`` runs in seconds on a CPU with the tiny bundle (tests, CI, smoke runs);
``default`` is a sensible production recipe; ``paper-scale`` is recipe R of
docs/DESIGN.md §8 (stage 1 500 iterations, embedding 500 steps, fine-tune 1000 steps,
50 DDIM render steps). Both work at the model's native size (its UNet's
``sample_size`` x the VAE factor: 512x512 for SD 1.x and 2.x-base, 768x768 for
SD 2.x 768-v), aspect kept; ``smoke`` sets 64x64.
"""

from __future__ import annotations

import dataclasses
import types
import typing
import warnings
from dataclasses import dataclass, field, replace

from diffcolor.common.errors import UserError
from diffcolor.method.align import AlignConfig
from diffcolor.method.merge import MergeConfig
from diffcolor.method.render import RenderConfig
from diffcolor.method.stage1 import Stage1Config
from diffcolor.method.stage2 import Stage2Config
from diffcolor.method.training import CheckpointPolicy

# The names diffcolor.archive.images accepts (MASTER_COMPRESSIONS, ACCESS_FORMATS; a test checks they agree).
MASTER_COMPRESSIONS = ("lzw", "none", "deflate")
ACCESS_FORMATS = ("JPEG", "JPG", "PNG", "WEBP")


@dataclass(frozen=True)
class PipelineConfig:
    """Everything that decides an item's pixels (it is part of the item's cache key)."""

    # docs/DESIGN.md §3.2: the model sees about its training size, aspect kept. None: the model's native side squared
    # (Models.working_pixels: UNet sample_size x VAE factor, 512 for SD 1.x and 2.x-base, 768 for SD 2.x 768-v).
    model_pixels: int | None = None
    stage1: Stage1Config = field(default_factory=Stage1Config)
    align: AlignConfig = field(default_factory=AlignConfig)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    render: RenderConfig = field(default_factory=RenderConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    access_format: str = "JPEG"  # access copy: "JPEG" or "PNG"
    access_max_side: int | None = 2048  # ours: access copies are for screens; None keeps full size
    master_compression: str = "lzw"  # lossless master TIFF: "lzw" (baseline-safe), "none" or "deflate"

    def __post_init__(self) -> None:
        # Refused when the configuration is made (a --set), not after a fit when the first master is written.
        if self.master_compression not in MASTER_COMPRESSIONS:
            raise UserError(f"master_compression must be one of {', '.join(MASTER_COMPRESSIONS)}, "
                            f"got {self.master_compression!r}")
        if str(self.access_format).upper() not in ACCESS_FORMATS:
            raise UserError(f"access_format must be one of {', '.join(ACCESS_FORMATS)}, got {self.access_format!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PipelineConfig":
        """The configuration of ``to_dict`` output, also of configurations stored under a field's former name."""
        render = data.get("render")
        if isinstance(render, dict) and "eta" in render and "alpha" not in render:  # stored before the rename
            data = dict(data, render={("alpha" if key == "eta" else key): value for key, value in render.items()})
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


# Former names of fields, still accepted by apply_overrides with a FutureWarning (shown by default).
RENAMED_FIELDS = {"render.eta": "render.alpha"}


def apply_overrides(config: PipelineConfig, overrides: dict[str, object]) -> PipelineConfig:
    """``config`` with dotted fields replaced, e.g. ``{"stage1.steps": 200, "render.alpha": 0.8}``.

    Each value is checked against the field's declared type (an integer
    field takes an integer, a float field a number, a ``tuple[int, int]`` a
    list of two integers, an optional field also ``None``) and converted to it.
    Raises UserError naming an unknown field, a field that is a whole group
    (``stage1``: set its fields instead), or a value of the wrong type.
    A field's former name (:data:`RENAMED_FIELDS`) sets the field, with a
    FutureWarning naming the new one.
    """
    for dotted, value in overrides.items():
        if dotted in RENAMED_FIELDS:
            warnings.warn(f"{dotted!r} is deprecated; it is now {RENAMED_FIELDS[dotted]!r}", FutureWarning, stacklevel=2)
            dotted = RENAMED_FIELDS[dotted]
        path = dotted.split(".")
        parents = [config]
        for name in path[:-1]:
            parents.append(getattr(parents[-1], _field_name(parents[-1], name, dotted)))
        name = _field_name(parents[-1], path[-1], dotted)
        declared = typing.get_type_hints(type(parents[-1]))[name]
        updated = replace(parents[-1], **{name: _typed_value(declared, value, dotted)})
        for parent, parent_name in zip(reversed(parents[:-1]), reversed(path[:-1])):
            updated = replace(parent, **{parent_name: updated})
        config = updated
    return config


def _field_name(parent: object, name: str, dotted: str) -> str:
    if not dataclasses.is_dataclass(parent) or name not in {f.name for f in dataclasses.fields(parent)}:
        raise UserError(f"unknown configuration field {dotted!r}")
    return name


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "text"}


def _typed_value(declared, value: object, dotted: str):
    """``value`` as the declared type of field ``dotted``, or UserError saying what the field takes."""
    origin, arguments = typing.get_origin(declared), typing.get_args(declared)
    if dataclasses.is_dataclass(declared):
        fields = ", ".join(f"{dotted}.{f.name}" for f in dataclasses.fields(declared))
        raise UserError(f"{dotted!r} is a group of settings; set its fields instead ({fields})")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in arguments:
            return None
        for option in (a for a in arguments if a is not type(None)):
            try:
                return _typed_value(option, value, dotted)
            except ValueError:
                continue
        raise UserError(f"{dotted!r} takes {_describe_type(declared)}, got {value!r}")
    if origin is tuple and isinstance(value, (list, tuple)):
        kinds = arguments[:1] * len(value) if arguments[-1:] == (Ellipsis,) else arguments  # tuple[str, ...] or fixed
        try:
            if len(value) == len(kinds):
                return tuple(_typed_value(kind, element, dotted) for kind, element in zip(kinds, value))
        except ValueError:
            pass
    if declared is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if declared in _TYPE_WORDS and isinstance(value, declared) and not (declared is int and isinstance(value, bool)):
        return value
    raise UserError(f"{dotted!r} takes {_describe_type(declared)}, got {value!r}")


def _describe_type(declared) -> str:
    origin, arguments = typing.get_origin(declared), typing.get_args(declared)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe_type(a) for a in arguments)
    if origin is tuple:
        if len(arguments) == 2 and arguments[1] is Ellipsis:
            return f"a list of {_describe_type(arguments[0])} values"
        return f"a list of {len(arguments)} values ({', '.join(_describe_type(a) for a in arguments)})"
    return _TYPE_WORDS.get(declared, getattr(declared, "__name__", str(declared)))


def get_preset(name: str) -> PipelineConfig:
    """The named preset; raises UserError naming the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise UserError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None


__all__ = ["PRESETS", "PipelineConfig", "apply_overrides", "get_preset", "replace"]
