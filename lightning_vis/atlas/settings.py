"""What an atlas is made with: the settings that decide its files (recorded in atlas.json; a run resumes only an
atlas made with the same), and the per-render seeds."""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass, field

from .digests import describe


@dataclass
class Settings:
    """k: top-k and bottom-k dataset examples per unit; size, steps, image_channels: renders (H or (H, W)); batch: units
    rendered together, in two optimisations (batch x 2 images: positive and negative renders; then batch x diverse: the
    diverse renders, normalised by what the positive ones reached); diversity_weight: weight of Lucid's diversity term
    against the unit's normalised activation; connections: the strongest positive and negative connections shown per
    direction; max_units: the first units of each layer only (None: all); tile: the size crops are shown at; seed:
    each render is seeded by (seed, layer, unit, kind), never by the process that renders it nor by the units rendered
    with it (so `batch` changes speed and memory, never a file); render: more lv.render arguments (transforms, param,
    lr, ...)."""

    k: int = 9
    size: tuple[int, ...] = (128, 128)
    steps: int = 128
    image_channels: int = 3
    batch: int = 32
    diverse: int = 4
    diversity_weight: float = 1.0
    negative: bool = True
    connections: int = 6
    max_units: int | None = None
    tile: int = 96
    seed: int = 0
    render: dict = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.size, int):
            self.size = (self.size, self.size)
        self.size = tuple(int(v) for v in self.size)
        for name, low in (("k", 1), ("steps", 1), ("batch", 1), ("diverse", 0), ("connections", 0), ("tile", 8)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
        if len(self.size) not in (2, 3) or min(self.size) < 8 or max(self.size) > 4096:
            raise ValueError(f"size must be H, (H, W) or (T, H, W) between 8 and 4096, got {self.size}")
        if self.image_channels not in (1, 3):
            raise ValueError(f"image_channels must be 1 or 3, got {self.image_channels}")
        if self.max_units is not None and (not isinstance(self.max_units, int) or self.max_units < 1):
            raise ValueError(f"max_units must be a positive integer or None, got {self.max_units!r}")
        if not self.diversity_weight >= 0:
            raise ValueError(f"diversity_weight must be >= 0, got {self.diversity_weight!r}")

    def record(self) -> dict:
        """JSON-able, stable: what atlas.json keeps of the settings that decide its files (render arguments by their
        stable description; not `batch`, which decides only how many units are rendered at once)."""
        out = asdict(self)
        del out["batch"]
        out["size"] = list(self.size)
        out["render"] = {k: describe(v) for k, v in sorted(self.render.items())}
        return out


def unit_seeds(seed: int, layer: str, units: list[int], kind: str, copies: int = 1) -> list[int]:
    """One seed per render of each unit (`copies` each, e.g. its diverse renders), from (seed, layer, unit, kind,
    copy) alone: stable across processes, runs and batches (crc32, not Python's salted hash)."""
    return [(seed * 1_000_003 + zlib.crc32(f"{layer}\0{u}\0{kind}\0{c}".encode())) % (2 ** 31 - 1)
            for u in units for c in range(copies)]
