"""Several reference embeddings of one person -> one, for IP-Adapter with several reference images
(K. M. Kazistova, I. D. Stepanov, A. V. Filatov, "Создание персонализированных генераций изображений" [Creating
personalized image generations], MIPT / Skoltech; undated (it cites IP-Adapter, 2023), no arXiv id). The
aggregation G sits before the unchanged IP-Adapter projection and decoupled cross-attention (Ye et al. 2023,
arXiv 2308.06721; ``adapter.py``).

Methods, over the N rows of an (N, D) or (N, T, D) tensor (for (N, T, D) each of the T positions separately):
- ``mean``: average pooling; ``max``: element-wise max pooling (the paper's two baselines).
- ``norm-mean``: each row L2-normalised, averaged, and the result rescaled to the rows' mean norm (identity
  embeddings whose norm varies with image quality then weigh equally).
- ``self-attention``: the paper's trained aggregator. One attention over the N references with learned
  Q, K, V and W_out, a residual and average pooling: ``G(X) = mean_n(X + softmax(Q Kᵀ/√d) V W_out)``.
  With W_out = 0 it *is* the mean, which is where training starts. No positional encoding, so G is
  invariant to the order of its N inputs. N is fixed at training (the paper: 9 of 10 images, one left out):
  more inputs are cut to the first N; fewer are bootstrapped: every given reference is kept and the
  missing rows are drawn with replacement from them by a seeded generator (the paper's resampling).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..weights.manifest import load_state_dict
from ..weights.packfile import PackFileError, shape_error

METHODS = ("mean", "max", "norm-mean", "self-attention")


@dataclass(frozen=True)
class RefEmbeds:
    """The IPADAPTER_EMBEDS socket: N reference embeddings of one kind.

    embeds: (N, D) (CLIP image embeds, face embeddings) or (N, T, D) (CLIP hidden states), float32, CPU.
    kind: "clip_embeds" | "clip_hidden" | "face" (what an IP-Adapter variant consumes,
        adapter.INPUT_KINDS).
    model: the encoder that made them. source_index: each row's image in the input batch (-1: aggregated).
    notes: report lines carried downstream (references skipped and why).
    """

    embeds: torch.Tensor
    kind: str
    model: str
    source_index: tuple[int, ...]
    notes: tuple[str, ...] = ()

    def __len__(self) -> int:
        return int(self.embeds.shape[0])

    def select(self, rows: list[int], note: str | None = None) -> RefEmbeds:
        notes = self.notes + ((note,) if note else ())
        return replace(self, embeds=self.embeds[rows], source_index=tuple(self.source_index[i] for i in rows),
                       notes=notes)


def usable_rows(x: torch.Tensor) -> tuple[list[int], list[int]]:
    """(kept, dropped) row indices: rows with NaN/inf or all zeros (a failed or faceless encode) are dropped."""
    flat = x.reshape(x.shape[0], -1)
    bad = (~torch.isfinite(flat)).any(1) | (flat == 0).all(1)
    return (~bad).nonzero().flatten().tolist(), bad.nonzero().flatten().tolist()


def fit_count(x: torch.Tensor, n: int, seed: int = 0) -> tuple[torch.Tensor, str]:
    """x with exactly n rows: the first n if there are more; all of them plus rows resampled with replacement
    (seeded) if there are fewer. Returns the rows and a report line."""
    m = x.shape[0]
    if m == n:
        return x, f"{m} references (as trained)"
    if m > n:
        return x[:n], f"{m} references cut to the first {n} (the aggregator was trained on {n})"
    g = torch.Generator().manual_seed(int(seed))
    extra = torch.randint(0, m, (n - m,), generator=g)
    note = f"{m} references bootstrapped to {n} (resampled rows {extra.tolist()}, seed {seed})"
    return torch.cat([x, x[extra]]), note


class SelfAttentionAggregator(nn.Module):
    """G(X) = mean_n(X + softmax(Q Kᵀ/√d) V W_out) over the N references of X (B, N, D) -> (B, D)."""

    def __init__(self, dim: int, n_refs: int, heads: int = 1):
        super().__init__()
        if dim % heads:
            raise ValueError(f"SelfAttentionAggregator: dim {dim} is not divisible by heads {heads}")
        self.q, self.k, self.v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.out = nn.Linear(dim, dim)
        nn.init.zeros_(self.out.weight)  # starts as average pooling
        nn.init.zeros_(self.out.bias)
        self.register_buffer("n_refs", torch.tensor(int(n_refs)))
        self.register_buffer("heads", torch.tensor(int(heads)))

    @property
    def dim(self) -> int:
        return self.q.in_features

    def forward(self, x):  # (B, N, D) -> (B, D)
        b, n, d = x.shape
        h = int(self.heads)
        q, k, v = (f(x).reshape(b, n, h, d // h).transpose(1, 2) for f in (self.q, self.k, self.v))  # (B, h, N, d/h)
        a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // h), dim=-1) @ v
        return (x + self.out(a.transpose(1, 2).reshape(b, n, d))).mean(1)


def save_aggregator(agg: SelfAttentionAggregator, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    save_file({k: t.detach().cpu().contiguous() for k, t in agg.state_dict().items()}, str(path), metadata=metadata)


def load_aggregator(path: str | Path) -> SelfAttentionAggregator:
    label, writer = "self-attention aggregator", "scripts/train_aggregator.py"
    sd = load_state_dict(path, label, writer)
    need = {"q.weight", "k.weight", "v.weight", "out.weight", "out.bias", "n_refs", "heads"}
    if not need <= sd.keys():
        raise PackFileError(path, "wrong_kind", f"not a {label}", expected=f"tensors {sorted(need)}",
                            found=f"no {sorted(need - sd.keys())}", label=label, writer=writer)
    try:
        agg = SelfAttentionAggregator(sd["q.weight"].shape[1], int(sd["n_refs"]), int(sd["heads"]))
        agg.load_state_dict(sd)
    except (RuntimeError, ValueError, IndexError) as e:  # inconsistent widths, heads or extra tensors
        raise shape_error(path, "square (D, D) q/k/v/out weights, out.bias (D,), n_refs and heads",
                          {k: tuple(v.shape) for k, v in sd.items()}, label=label, writer=writer,
                          what=f"its tensors do not make one aggregator ({str(e).splitlines()[0]})") from None
    return agg.float().eval().requires_grad_(False)


def aggregate(x: torch.Tensor, method: str, aggregator: SelfAttentionAggregator | None = None,
              seed: int = 0) -> tuple[torch.Tensor, str]:
    """(N, D) or (N, T, D) -> (1, D) or (1, T, D), and a report line."""
    if x.shape[0] == 0:
        raise ValueError("aggregate: no references")
    if method == "mean":
        return x.mean(0, keepdim=True), f"mean of {x.shape[0]}"
    if method == "max":
        return x.amax(0, keepdim=True), f"max of {x.shape[0]}"
    if method == "norm-mean":
        norms = x.norm(dim=-1, keepdim=True)
        return (F.normalize(x, dim=-1).mean(0, keepdim=True) * norms.mean(0, keepdim=True)), \
            f"norm-mean of {x.shape[0]}"
    if method != "self-attention":
        raise ValueError(f"aggregate: method must be one of {METHODS}, got {method!r}")
    if aggregator is None:
        raise ValueError("aggregate: method 'self-attention' needs trained aggregator weights")
    if x.shape[-1] != aggregator.dim:
        raise ValueError(f"aggregate: the embeddings are {x.shape[-1]}-d but the aggregator takes {aggregator.dim}-d")
    rows, note = fit_count(x, int(aggregator.n_refs), seed)
    p = next(aggregator.parameters())
    seq = rows.reshape(rows.shape[0], -1, rows.shape[-1]).transpose(0, 1)  # (T, N, D): each position on its own
    with torch.no_grad():
        out = aggregator(seq.to(p.device, p.dtype)).float().cpu()  # (T, D)
    return out.reshape(1, *x.shape[1:]), f"self-attention: {note}"
