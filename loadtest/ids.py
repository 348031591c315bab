"""Id pools the load generator draws from (no Locust import: the driver uses them too)."""

from __future__ import annotations

import bisect
import itertools
import random
from pathlib import Path


class ZipfIds:
    """Ids drawn with P(rank r) proportional to r^-s; ranks are a seeded shuffle of the file.

    Shuffled so the hot ids are not simply the smallest ones (ids are often sorted).
    """

    def __init__(
        self, path: str | Path | None, s: float, seed: int, ids: list[str] | None = None
    ) -> None:
        if ids is None:
            text = Path(path).read_text(encoding="utf-8") if path is not None else ""
            ids = text.split("\n")[:-1] if text else []
        ids = list(ids)
        if not ids:
            raise ValueError(f"{path}: no ids")
        random.Random(seed).shuffle(ids)
        self.ids = ids
        self.cum = list(itertools.accumulate(r**-s for r in range(1, len(ids) + 1)))

    def draw(self, rng: random.Random) -> str:
        return self.ids[bisect.bisect_left(self.cum, rng.random() * self.cum[-1])]
