"""Several reference embeddings of one person -> one, for IP-Adapter with several reference images
(K. M. Kazistova, I. D. Stepanov, A. V. Filatov, "Создание персонализированных генераций изображений" [Creating
personalized image generations], MIPT / Skoltech; undated (it cites IP-Adapter, 2023), no arXiv id). The
aggregation G sits before the unchanged IP-Adapter projection and decoupled cross-attention (Ye et al. 2023,
arXiv 2308.06721; ``adapter.py``).

Methods, over the N rows of an (N, D) or (N, T, D) tensor (for (N, T, D) each of the T positions separately):
- ``mean``: average pooling; ``max``: element-wise max pooling (the paper's two baselines).
- ``norm-mean``: each row L2-normalised, averaged, and the result rescaled to the rows' mean norm (identity
  embeddings whose norm varies with image quality then weigh equally).
- ``self-attention``: the paper's trained aggregator, one attention over the N references with learned Q, K, V
  and W_out, in one of two modes (``ATTENTION_MODES``, stored in the aggregator file's metadata):
  - ``residual`` (the pack's first version; files without the metadata are this mode):
    ``G(X) = mean_n(X + softmax(Q Kᵀ/√d) V W_out + b_out)`` with W_out = 0, b_out = 0 at the start, so an untrained
    G *is* average pooling and the frozen public IP-Adapter sees what it was trained on.
  - ``paper``: exactly the paper's Algorithm 1 (section 3.5), ``Z = softmax(Q Kᵀ/√d_k) V``, ``return Z · W_out``
    (no bias, no residual), then the mean over its N output rows. Algorithm 1 returns N tokens but the
    IP-Adapter takes one image feature: the paper's eq. 1 writes ``c_i = G(Γ_i(x_1), ..., Γ_i(x_n))``, one
    feature, and section 3.5 says "После завершения работы модуля Self-Attention следуют модули IP-Adapter без
    изменений" (the unchanged IP-Adapter modules follow); section 3.4's pooling (Average Pooling) is how the
    paper makes N embeddings one, so the N rows of Z · W_out are averaged. The paper gives no initialisation:
    W_v = W_out = I (Q, K PyTorch's default), so training starts at an attention-weighted average of the
    references, close to the input the pretrained projection expects.
  No positional encoding, so G is invariant to the order of its N inputs. N is fixed at training (the paper: 9
  of 10 images, one left out): more inputs are cut to the first N; fewer are bootstrapped: every given reference
  is kept and the missing rows are drawn with replacement from them by a seeded generator (the paper's
  resampling).

Files: ``q.weight``, ``k.weight``, ``v.weight``, ``out.weight`` (+ ``out.bias`` in residual mode), ``n_refs``,
``heads``; metadata ``attention`` = the mode. The same tensors under ``aggregator.`` inside a full IP-Adapter
file (``scripts/train_aggregator.py --train adapter``) are read too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..weights import packfile, packmeta
from ..weights.manifest import load_state_dict
from ..weights.packfile import PackFileError, clip, shape_error

METHODS = ("mean", "max", "norm-mean", "self-attention")
ATTENTION_MODES = ("residual", "paper")  # see the module docstring; files without metadata: residual
FILE_PREFIX = "aggregator."  # the aggregator's tensors inside a full IP-Adapter file


@dataclass(frozen=True)
class RefEmbeds:
    """The IPADAPTER_EMBEDS socket: N reference embeddings of one kind.

    embeds: (N, D) (CLIP image embeds, face embeddings) or (N, T, D) (CLIP hidden states), float32, CPU.
    kind: "clip_embeds" | "clip_hidden" | "face" | "face+clip_hidden" (what an IP-Adapter variant consumes,
        variants.INPUT_KINDS).
    model: the encoder that made them. source_index: each row's image in the input batch (-1: aggregated).
    notes: report lines carried downstream (references skipped and why).
    clip: "face+clip_hidden" (FaceID Plus) only: (N, T, D) CLIP hidden states of each row's aligned face crop, and
        clip_neg (1, T, D) those of the unconditional (zero after CLIP's normalisation) image.
    """

    embeds: torch.Tensor
    kind: str
    model: str
    source_index: tuple[int, ...]
    notes: tuple[str, ...] = ()
    clip: torch.Tensor | None = None
    clip_neg: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.embeds.shape[0])

    def select(self, rows: list[int], note: str | None = None) -> RefEmbeds:
        notes = self.notes + ((note,) if note else ())
        return replace(self, embeds=self.embeds[rows], source_index=tuple(self.source_index[i] for i in rows),
                       notes=notes, clip=None if self.clip is None else self.clip[rows])


def usable_rows(x: torch.Tensor) -> tuple[list[int], list[int]]:
    """(kept, dropped) row indices: rows with NaN/inf or all zeros (a failed or faceless encode) are dropped."""
    flat = x.reshape(x.shape[0], -1)
    bad = (~torch.isfinite(flat)).any(1) | (flat == 0).all(1)
    return (~bad).nonzero().flatten().tolist(), bad.nonzero().flatten().tolist()


def drop_unusable(embeds: RefEmbeds) -> RefEmbeds:
    """``embeds`` without its NaN or all-zero rows; the skipped references are added to its notes."""
    kept, dropped = usable_rows(embeds.embeds)
    if not dropped:
        return embeds
    skipped = [embeds.source_index[i] for i in dropped]
    return embeds.select(kept, f"references {skipped} skipped (NaN or zero embedding)")


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
    """X (B, N, D) -> (B, D). ``attention="residual"``: mean_n(X + softmax(Q Kᵀ/√d) V W_out + b_out), W_out = 0 at
    the start. ``attention="paper"``: mean_n(softmax(Q Kᵀ/√d_k) V W_out), Algorithm 1 of the paper, W_v = W_out = I
    at the start. Q = X W_q, K = X W_k, V = X W_v (no biases); heads split D as in Vaswani et al. 2017."""

    def __init__(self, dim: int, n_refs: int, heads: int = 1, attention: str = "residual"):
        super().__init__()
        if dim % heads:
            raise ValueError(f"SelfAttentionAggregator: dim {dim} is not divisible by heads {heads}")
        if attention not in ATTENTION_MODES:
            raise ValueError(f"SelfAttentionAggregator: attention must be one of {ATTENTION_MODES}, got {attention!r}")
        self.attention = attention
        self.trained_with = ""  # the IP-Adapter file it was trained with (file metadata ``ipadapter``), for reports
        self.q, self.k, self.v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.out = nn.Linear(dim, dim, bias=attention == "residual")
        if attention == "residual":
            nn.init.zeros_(self.out.weight)  # starts as average pooling
            nn.init.zeros_(self.out.bias)
        else:
            nn.init.eye_(self.v.weight)  # starts as an attention-weighted average of the references
            nn.init.eye_(self.out.weight)
        self.register_buffer("n_refs", torch.tensor(int(n_refs)))
        self.register_buffer("heads", torch.tensor(int(heads)))

    @property
    def dim(self) -> int:
        return self.q.in_features

    def tokens(self, x):  # (B, N, D) -> (B, N, D): Algorithm 1's Z · W_out, one row per reference
        b, n, d = x.shape
        h = int(self.heads)
        q, k, v = (f(x).reshape(b, n, h, d // h).transpose(1, 2) for f in (self.q, self.k, self.v))  # (B, h, N, d/h)
        z = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // h), dim=-1) @ v
        return self.out(z.transpose(1, 2).reshape(b, n, d))

    def forward(self, x):  # (B, N, D) -> (B, D)
        out = self.tokens(x)
        return (x + out).mean(1) if self.attention == "residual" else out.mean(1)


def save_aggregator(agg: SelfAttentionAggregator, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """The aggregator alone; its mode goes into the metadata (``attention``)."""
    from ..weights.atomic import save_file

    save_file(aggregator_tensors(agg), str(path), metadata={**(metadata or {}), "attention": agg.attention})


def aggregator_tensors(agg: SelfAttentionAggregator, prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + k: t.detach().cpu().contiguous() for k, t in agg.state_dict().items()}


MAX_DIM, MAX_REFS = 8192, 1024  # bounds on an aggregator file (README "Limits"; the paper: D = 512..1280, N = 9)


def load_aggregator(path: str | Path) -> SelfAttentionAggregator:
    """An aggregator file, or the ``aggregator.*`` part of a full IP-Adapter file; the mode from the metadata
    (``attention``; absent: residual, what files from before the mode existed are). The tensor names and shapes
    are checked against the mode before any tensor is read (safetensors: from the header), then n_refs
    (1..``MAX_REFS``) and heads (dividing D); float weights only, all finite."""
    label, writer = "self-attention aggregator", "scripts/train_aggregator.py"
    modes: list[str] = []

    def plan(meta, specs):
        mode = meta.get("attention", "residual")
        if mode not in ATTENTION_MODES:
            raise PackFileError(path, "bad_metadata", f"unknown self-attention mode {clip(repr(mode), 80)}",
                                expected=f"attention one of {ATTENTION_MODES}", label=label, writer=writer)
        modes.append(mode)
        _check_layout(path, mode, _own(packmeta.meta_tensors(specs)), label, writer)

    ints = {k: packfile.INT_DTYPES for k in ("n_refs", "heads", FILE_PREFIX + "n_refs", FILE_PREFIX + "heads")}
    if Path(path).suffix == ".safetensors":
        meta, sd = packfile.read(path, label=label, writer=writer, plan=plan, dtypes=ints)
    else:  # a torch file (weights only) has no metadata: residual
        meta, sd = {}, load_state_dict(path, label, writer, dtypes=ints, plan=plan)
    sd = _own(sd)
    dim, mode = _check_layout(path, modes[0], sd, label, writer), modes[0]
    n_refs, heads = int(sd["n_refs"]), int(sd["heads"])
    if not (1 <= n_refs <= MAX_REFS and 1 <= heads <= dim and dim % heads == 0):
        raise PackFileError(path, "wrong_shape", "its n_refs or heads are out of range",
                            expected=f"n_refs 1..{MAX_REFS}, heads dividing D={dim}",
                            found=f"n_refs={n_refs}, heads={heads}", label=label, writer=writer)
    agg = packmeta.build(path, lambda: SelfAttentionAggregator(dim, n_refs, heads, mode), sd, label=label,
                         writer=writer, what=f"its tensors do not make one aggregator ({mode} mode)")
    agg.trained_with = clip(meta.get("ipadapter", ""), 120)
    return agg.eval().requires_grad_(False)


def _own(sd: dict) -> dict:
    """The aggregator's tensors: the file's, or the ``aggregator.*`` part of a full IP-Adapter file."""
    if "q.weight" not in sd and FILE_PREFIX + "q.weight" in sd:
        return {k[len(FILE_PREFIX):]: v for k, v in sd.items() if k.startswith(FILE_PREFIX)}
    return sd


def _check_layout(path, mode: str, sd: dict, label: str, writer: str) -> int:
    """D, when ``sd`` (tensors or meta stand-ins) has exactly the names and shapes of a ``mode`` aggregator."""
    need = {"q.weight", "k.weight", "v.weight", "out.weight", "n_refs", "heads"} | \
        ({"out.bias"} if mode == "residual" else set())
    if not need <= sd.keys():
        raise PackFileError(path, "wrong_kind", f"not a {label} ({mode} mode)", expected=f"tensors {sorted(need)}",
                            found=f"no {sorted(need - sd.keys())}", label=label, writer=writer)
    q = sd["q.weight"]
    dim = q.shape[1] if q.ndim == 2 else 0
    if not 1 <= dim <= MAX_DIM:
        raise shape_error(path, f"q.weight (D, D) with 1 <= D <= {MAX_DIM}", f"q.weight {tuple(q.shape)}",
                          label=label, writer=writer, what="its width is not one an aggregator has")
    packmeta.build(path, lambda: SelfAttentionAggregator(dim, 1, 1, mode), packmeta.meta_tensors(
        {k: (packfile.torch_dtype_name(v), tuple(v.shape)) for k, v in sd.items()}), label=label, writer=writer,
        what=f"its tensors do not make one aggregator ({mode} mode)")
    return dim


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
    pair = f", trained with IP-Adapter {aggregator.trained_with}" if aggregator.trained_with else ""
    return out.reshape(1, *x.shape[1:]), f"self-attention ({aggregator.attention} mode{pair}): {note}"
