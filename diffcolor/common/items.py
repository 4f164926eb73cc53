"""What to do with one item: the request that travels from a manifest row to a worker."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ItemRequest:
    """What to do with one item (a manifest row, or the single-image CLI's arguments)."""

    item_id: str  # a safe path component (diffcolor.common.ids)
    source_uri: str
    caption: str
    targets: tuple[str, ...] = ()  # free target prompts; none: the primary colourisation is the derivative
    color_map: dict[str, str] = field(default_factory=dict)  # {"dog": "brown"}: one more target, token-aligned
    seed: int = 0
    catalogue: dict = field(default_factory=dict)  # catalogue fields carried into records and metadata
    force: bool = False  # process colour inputs too
