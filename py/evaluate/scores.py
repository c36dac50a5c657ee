"""The EVAL_SCORES socket: one metric's per-image values, and the papers' aggregates over them."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .metrics import AGGREGATES, aggregate, best_of_n


@dataclass(frozen=True)
class ImageScores:
    """Per-image values of one metric for one image batch.

    metric: "identity", "clip" or an aggregate name ("livshits", "face0").
    values: one per image; NaN where the metric has no value (an image without a face).
    model: which model measured it (recogniser id, CLIP folder, or the two joined for an aggregate).
    """

    metric: str
    values: tuple[float, ...]
    model: str

    def __len__(self) -> int:
        return len(self.values)

    @property
    def missing(self) -> list[int]:
        return [i for i, v in enumerate(self.values) if math.isnan(v)]


def groups_of(n: int, per_group: int) -> list[int]:
    """Group label of each of n images when consecutive blocks of ``per_group`` are one prompt's seeds
    (0: the whole batch is one group)."""
    if per_group <= 0:
        return [0] * n
    if n % per_group:
        raise ValueError(f"{n} images do not split into groups of {per_group}")
    return [i // per_group for i in range(n)]


def combine(identity: ImageScores, clip: ImageScores, kind: str) -> ImageScores:
    """The paper aggregate of each image (NaN where the identity score is missing)."""
    if kind not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {kind!r}")
    if len(identity) != len(clip):
        raise ValueError(f"{len(identity)} identity scores but {len(clip)} CLIP scores: score the same images")
    vals = tuple(aggregate(kind, c, i) for i, c in zip(identity.values, clip.values))
    return ImageScores(kind, vals, f"{identity.model} + {clip.model}")


def summary_lines(scores: ImageScores, per_group: int) -> tuple[float, float, list[str]]:
    """(best-of-N, mean, report lines) of one metric's values."""
    r = best_of_n(list(scores.values), groups_of(len(scores), per_group))
    n_per = per_group if per_group > 0 else len(scores)
    lines = [f"{scores.metric} ({scores.model}) over {len(scores)} image(s): mean {r.mean:+.4f}, best of "
             f"{n_per} (mean over {r.groups} group(s)) {r.best:+.4f}; without a value: {r.missing}"]
    lines += [f"image {i}: " + ("-" if math.isnan(v) else f"{v:+.4f}") for i, v in enumerate(scores.values)]
    return r.best, r.mean, lines
