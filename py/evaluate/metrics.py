"""Metric maths of the papers' evaluation protocols: cosines, aggregates, best-of-N, Inception Score.

- Identity score (every paper): cosine between the face-recognition embedding of a generated face and the
  reference photos' embeddings. ``reference_cosines`` offers the mean of the cosines over the reference photos
  (default), the best one, or the cosine with the references' mean direction ("centroid").
- Face0 (Valevski, Wasserman, Matias, Leviathan, "Face0: Instantaneously Conditioning a Text-to-Image Model
  on a Face", 2023, arXiv 2306.06638), Table 2: overall = text alignment + face alignment (0.24 + 0.72 = 0.96),
  reported as the best of 8 seeds and as the average over seeds.
- Livshits ("Personalisation of face generation with modified textual inversion", 2023, doi
  10.21685/2587-7704-2023-8-2-6), eq. 4: ``score = (1 + score_clip) · (1 + score_id)``.
- Kazistova, Stepanov, Filatov (multi-reference IP-Adapter, 2023): FID and IS; their IS (eq. 5) takes p(y)
  as the *uniform* distribution over classes, the standard IS (Salimans et al., "Improved Techniques for
  Training GANs", 2016, arXiv 1606.03498) the marginal of p(y|x) over the images. ``inception_score`` offers both.

Missing values (an image without a face) are NaN; aggregates skip them and report how many were skipped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

REFERENCE_MODES = ("mean", "max", "centroid")
AGGREGATES = ("livshits", "face0")
IS_PRIORS = ("marginal", "uniform")


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine of (N, D) and (N, D) (or broadcastable) in float64; zero rows give 0."""
    a, b = a.double(), b.double()
    return (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1)


def reference_cosines(gen: torch.Tensor, ref: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """(N, D) generated x (M, D) reference embeddings -> (N,) identity scores (float64).

    mean: the average of the N x M cosines over the references; max: the best reference;
    centroid: the cosine with the mean of the L2-normalised references."""
    if mode not in REFERENCE_MODES:
        raise ValueError(f"reference mode must be one of {REFERENCE_MODES}, got {mode!r}")
    if ref.ndim != 2 or ref.shape[0] == 0:
        raise ValueError(f"reference embeddings must be (M, D) with M >= 1, got shape {tuple(ref.shape)}")
    if gen.shape[0] == 0:
        return torch.zeros(0, dtype=torch.float64)
    g, r = F.normalize(gen.double(), dim=1), F.normalize(ref.double(), dim=1)
    if mode == "centroid":
        return g @ F.normalize(r.mean(0), dim=0)
    sim = g @ r.T  # (N, M)
    return sim.mean(1) if mode == "mean" else sim.max(1).values


def livshits_score(clip: float, identity: float) -> float:
    """Livshits 2023, eq. 4: (1 + clip cosine) · (1 + identity cosine)."""
    return (1.0 + clip) * (1.0 + identity)


def face0_overall(text: float, face: float) -> float:
    """Face0 2023, Table 2: overall = text alignment (CLIP cosine) + face alignment (identity cosine)."""
    return text + face


def aggregate(kind: str, clip: float, identity: float) -> float:
    """The named paper aggregate of one image's CLIP and identity cosines (NaN if either is NaN)."""
    if kind == "livshits":
        return livshits_score(clip, identity)
    if kind == "face0":
        return face0_overall(clip, identity)
    raise ValueError(f"aggregate must be one of {AGGREGATES}, got {kind!r}")


def nanmean(values: Sequence[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return float(sum(vals) / len(vals)) if vals else float("nan")


@dataclass(frozen=True)
class BestOfN:
    best: float          # mean over groups of each group's best value (Face0's "best of 8 seeds")
    mean: float          # mean over every value (Face0's "average")
    groups: int          # groups with at least one value
    counted: int         # values that were not NaN
    missing: int         # NaN values skipped (e.g. images without a face)


def best_of_n(values: Sequence[float], groups: Sequence) -> BestOfN:
    """Best-of-N and mean: ``values[i]`` belongs to group ``groups[i]`` (e.g. one identity x prompt, the N being
    its seeds). best = mean over groups of the group's max; mean = mean over all values. NaN values are skipped;
    a group of only NaN does not count."""
    if len(values) != len(groups):
        raise ValueError(f"best_of_n: {len(values)} values for {len(groups)} group labels")
    per_group: dict = {}
    for v, g in zip(values, groups):
        if not math.isnan(v):
            per_group.setdefault(g, []).append(v)
    counted = sum(len(v) for v in per_group.values())
    best = nanmean([max(v) for v in per_group.values()])
    return BestOfN(best=best, mean=nanmean(list(values)), groups=len(per_group), counted=counted,
                   missing=len(values) - counted)


def inception_score(logits: torch.Tensor, prior: str = "marginal", splits: int = 1) -> tuple[float, float]:
    """Inception Score exp(E_x KL(p(y|x) || p(y))) of (N, C) class logits: (mean, std) over ``splits`` chunks.

    prior="marginal": p(y) is the mean of p(y|x) over the chunk (Salimans et al. 2016, the standard IS).
    prior="uniform": p(y) = 1/C (Kazistova et al.'s eq. 5), i.e. exp(log C - mean entropy of p(y|x))."""
    if prior not in IS_PRIORS:
        raise ValueError(f"prior must be one of {IS_PRIORS}, got {prior!r}")
    if logits.ndim != 2 or logits.shape[0] < splits or splits < 1:
        raise ValueError(f"inception_score needs (N, C) logits with N >= splits >= 1; got {tuple(logits.shape)}, "
                         f"splits={splits}")
    n, c = logits.shape
    log_p = logits.double().log_softmax(1)
    p = log_p.exp()
    scores = []
    for i in range(splits):
        lp, pp = log_p[i * n // splits:(i + 1) * n // splits], p[i * n // splits:(i + 1) * n // splits]
        log_q = pp.mean(0, keepdim=True).log() if prior == "marginal" else torch.full((1, c), -math.log(c),
                                                                                     dtype=torch.float64)
        kl = (pp * (lp - log_q)).sum(1)
        scores.append(float(kl.mean().exp()))
    arr = np.asarray(scores)
    return float(arr.mean()), float(arr.std())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||² + Tr(S1 + S2 - 2 (S1 S2)^½) (Heusel et al., "GANs Trained by a Two Time-Scale Update
    Rule Converge to a Local Nash Equilibrium", 2017, arXiv 1706.08500); the trace of the square root is
    the sum of the square roots of the eigenvalues of S1 S2."""
    diff = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
    eig = np.linalg.eigvals(np.asarray(sigma1, np.float64) @ np.asarray(sigma2, np.float64))
    tr_sqrt = float(np.sqrt(eig.astype(np.complex128)).real.sum())
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_sqrt)
