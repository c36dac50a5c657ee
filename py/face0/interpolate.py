"""Face-embedding arithmetic: interpolation, averaging, direction edits, noise and random identities.

Face0 (Valevski et al. 2023, §3.2, §4) controls the generated face through its embedding: linear
interpolation between two faces, (weighted) averages of several photos of one person, direction edits
``e + s·(e_b − e_a)``, a little Gaussian noise for diversity (results are otherwise very consistent
across seeds), and consistent characters from a fixed *random* embedding sampled from a simple Gaussian
mixture. All functions take and return (N, D) float tensors and never modify their inputs.

``normalized`` arguments: when the inputs were L2-normalised (``FaceEmbeds.normalized``), results are
projected back onto the unit sphere, so downstream models see embeddings of the kind they were trained on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def _renorm(x: torch.Tensor, normalized: bool) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1) if normalized else x


def lerp(e0: torch.Tensor, e1: torch.Tensor, t, normalized: bool = False) -> torch.Tensor:
    """(1 − t)·e0 + t·e1 for each t (a float or a (T,) tensor; t outside [0, 1] extrapolates). → (T·N, D)"""
    ts = torch.as_tensor(t, dtype=e0.dtype).reshape(-1, 1, 1)  # (T, 1, 1)
    out = e0[None] + ts * (e1 - e0)[None]  # (T, N, D)
    return _renorm(out.reshape(-1, e0.shape[-1]), normalized)


def slerp(e0: torch.Tensor, e1: torch.Tensor, t, normalized: bool = False) -> torch.Tensor:
    """Spherical interpolation along the great circle from e0 to e1; the norm is lerped (exact when both are 1).

    t outside [0, 1] keeps turning along the same circle. Nearly parallel rows fall back to lerp. → (T·N, D)
    """
    ts = torch.as_tensor(t, dtype=e0.dtype).reshape(-1, 1, 1)  # (T, 1, 1)
    n0, n1 = e0.norm(dim=-1, keepdim=True), e1.norm(dim=-1, keepdim=True)  # (N, 1)
    u0, u1 = e0 / n0.clamp_min(1e-12), e1 / n1.clamp_min(1e-12)
    omega = torch.acos((u0 * u1).sum(-1, keepdim=True).clamp(-1.0, 1.0))  # (N, 1)
    so = torch.sin(omega)
    parallel = so.abs() < 1e-6
    safe = torch.where(parallel, torch.ones_like(so), so)
    w0 = torch.where(parallel, 1 - ts, torch.sin((1 - ts) * omega) / safe)  # (T, N, 1)
    w1 = torch.where(parallel, ts, torch.sin(ts * omega) / safe)
    direction = w0 * u0 + w1 * u1  # (T, N, D), unit norm when not parallel
    out = direction * (n0 + ts * (n1 - n0))
    return _renorm(out.reshape(-1, e0.shape[-1]), normalized)


def weighted_mean(embeds: torch.Tensor, weights=None, normalized: bool = False) -> torch.Tensor:
    """Σ wᵢ·eᵢ / Σ wᵢ over the N rows (several photos of one person, Face0 §4). → (1, D)"""
    w = torch.ones(embeds.shape[0], dtype=embeds.dtype) if weights is None else torch.as_tensor(
        weights, dtype=embeds.dtype).reshape(-1)
    if w.shape[0] != embeds.shape[0]:
        raise ValueError(f"weighted_mean: {w.shape[0]} weights for {embeds.shape[0]} embeddings")
    total = float(w.sum())
    if abs(total) < 1e-12:
        raise ValueError("weighted_mean: the weights sum to zero")
    return _renorm((w[:, None] * embeds).sum(0, keepdim=True) / total, normalized)


def direction_edit(e: torch.Tensor, e_a: torch.Tensor, e_b: torch.Tensor, strength: float,
                   normalized: bool = False) -> torch.Tensor:
    """e + s·(e_b − e_a): move e along the direction from a to b (e.g. a face "with a mustache" minus the source)."""
    return _renorm(e + strength * (e_b - e_a), normalized)


def add_noise(e: torch.Tensor, sigma: float, seed: int, normalized: bool = False) -> torch.Tensor:
    """e + σ·z, z ~ N(0, I) from a seeded generator (same seed → same noise). σ is per dimension: for a unit-norm
    512-d embedding each coordinate is about 1/√512 ≈ 0.044, and ‖σz‖ ≈ σ·√D (σ = 0.01 moves it by about 0.23)."""
    g = torch.Generator().manual_seed(int(seed))
    z = torch.randn(e.shape, generator=g, dtype=torch.float32).to(e.dtype)
    return _renorm(e + sigma * z, normalized)


@dataclass(frozen=True)
class GaussianMixturePrior:
    """A mixture of Gaussians with diagonal covariance over face embeddings (Face0 §3.2's "simple mixture")."""

    weights: torch.Tensor  # (M,) sum to 1
    means: torch.Tensor    # (M, D)
    stds: torch.Tensor     # (M, D)

    def sample(self, count: int, seed: int, spread: float = 1.0) -> torch.Tensor:
        """``count`` embeddings from a generator seeded with ``seed`` (same seed → same identities). → (count, D)

        spread scales the deviations from the component means (0: the means themselves).
        """
        g = torch.Generator().manual_seed(int(seed))
        comp = torch.multinomial(self.weights, count, replacement=True, generator=g)  # (count,)
        z = torch.randn((count, self.means.shape[1]), generator=g)
        return self.means[comp] + spread * self.stds[comp] * z

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"prior.weights": self.weights, "prior.means": self.means, "prior.stds": self.stds}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> GaussianMixturePrior:
        return cls(tensors["prior.weights"].float(), tensors["prior.means"].float(), tensors["prior.stds"].float())


def fit_prior(embeds: torch.Tensor, components: int = 1, seed: int = 0, iters: int = 50,
              min_std: float | None = None) -> GaussianMixturePrior:
    """Fit a diagonal-covariance Gaussian mixture to (N, D) embeddings by EM (k-means++-style seeded init).

    With one component this is the per-dimension mean and standard deviation. ``min_std`` (default: 1% of the
    average per-dimension std of the whole set) keeps components of one or two points from collapsing.
    """
    x = embeds.detach().to(torch.float64)
    n, d = x.shape
    if n < 2:
        raise ValueError(f"fit_prior: need at least 2 embeddings to fit a distribution, got {n}")
    m = max(1, min(int(components), n))
    global_std = x.std(0, unbiased=True)
    floor = float(min_std) if min_std is not None else 0.01 * float(global_std.mean())
    floor = max(floor, 1e-6)
    if m == 1:
        return GaussianMixturePrior(torch.ones(1), x.mean(0, keepdim=True).float(),
                                    global_std.clamp_min(floor)[None].float())
    g = torch.Generator().manual_seed(int(seed))
    idx = [int(torch.randint(n, (1,), generator=g))]
    for _ in range(1, m):  # k-means++ seeding: far points first
        d2 = torch.cdist(x, x[idx]).min(1).values ** 2
        idx.append(int(torch.multinomial((d2 + 1e-12).float(), 1, generator=g)))
    means = x[idx].clone()  # (M, D)
    stds = global_std.clamp_min(floor).expand(m, d).clone()
    weights = torch.full((m,), 1.0 / m, dtype=torch.float64)
    for _ in range(iters):
        # E step: log N(x | μ, diag σ²) + log π → responsibilities (N, M)
        logp = (-0.5 * (((x[:, None] - means[None]) / stds[None]) ** 2).sum(-1)
                - torch.log(stds).sum(-1)[None] - 0.5 * d * math.log(2 * math.pi) + torch.log(weights)[None])
        resp = torch.softmax(logp, dim=1)
        nk = resp.sum(0) + 1e-10  # (M,)
        weights = nk / n
        means = (resp.T @ x) / nk[:, None]
        var = (resp.T @ (x ** 2)) / nk[:, None] - means ** 2
        stds = var.clamp_min(0).sqrt().clamp_min(floor)
    return GaussianMixturePrior(weights.float(), means.float(), stds.float())
