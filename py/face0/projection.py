"""Face0's projection: a face embedding → K context tokens that override the end of the text context.

Face0 (Valevski et al. 2023, §3.1): a 4-layer feed-forward network of width 768 with a ReLU after every
hidden layer maps the face embedding to three 768-d vectors that replace tokens 75-77 of Stable
Diffusion's 77-token CLIP context. It is trained jointly with the U-Net; 10% of the time the *projected*
embedding is set to zero so that the model learns a "no face" input for guidance.

This pack's convention (trainer and sampler share it through :func:`face_tokens`): a face embedding row that
is all zeros means "no face" and yields all-zero tokens, exactly the training-time dropout input — not
``MLP(0)``, which would be the biases pushed through the network.

File format (safetensors): tensors ``mlp.{0,2,4,6}.{weight,bias}``; metadata (all strings):
``facecond.kind = "face0_projection"``, ``format_version``, ``embedder`` (id of the face model whose
embeddings it takes, compared with ``FaceEmbeds.model``), ``embed_dim`` (D), ``tokens`` (K),
``context_dim`` (W: 768 SD1.x, 1024 SD2.x, 2048 SDXL), ``hidden`` (width h), ``depth`` (L, the number of
Linear layers; files written before it existed have none and are read as 4), ``base_model``
(``sd1``/``sd2``/``sdxl``/...), and optionally ``embed_normalized`` (whether it was trained on L2-normalised
embeddings). Tensors: ``mlp.{0,2,...,2(L-1)}.{weight,bias}``.

Size: ``parameter_count`` = (D+1)·h + (L-2)·(h+1)·h + (h+1)·K·W. The paper gives both "width 768, 4 layers" and
"~10M parameters", which cannot both hold: at h = 768, L = 4, W = 768, K = 3 it is 3,346,944 for D = 512 and
4,329,984 for D = 1792 (Inception-ResNet-V1 with its last layer dropped). ``PRESETS["paper"]`` keeps the four
layers and the ReLUs and doubles the width (h = 1536): 9,050,880 for D = 512, 11,016,960 for D = 1792.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from ..weights import packfile
from ..weights.atomic import save_file

KIND = "face0_projection"
FORMAT_VERSION = "1"
# Context width of the cross-attention text context for each base-model family (Face0 targets SD1.x).
CONTEXT_DIMS = {"sd1": 768, "sd2": 1024, "sdxl": 2048}
TOKENS_PER_CHUNK = 77  # CLIP context length; ComfyUI concatenates one 77-token chunk per 75 prompt tokens
# Projection shapes (hidden width h, Linear layers L). "small": the paper's stated width 768 (3.35M parameters at
# D = 512); "paper": its stated size, ~10M (see the module docstring for why the width differs).
PRESETS = {"small": {"hidden": 768, "depth": 4}, "paper": {"hidden": 1536, "depth": 4}}


def parameter_count(embed_dim: int, hidden: int = 768, depth: int = 4, tokens: int = 3, context_dim: int = 768) -> int:
    """Weights + biases of a ``depth``-layer projection D -> h -> ... -> h -> K·W (depth 1: D -> K·W)."""
    out = tokens * context_dim
    if depth == 1:
        return (embed_dim + 1) * out
    return (embed_dim + 1) * hidden + (depth - 2) * (hidden + 1) * hidden + (hidden + 1) * out


@dataclass(frozen=True)
class ProjectionInfo:
    """The facts a projection file declares; checked against the tensors on load."""

    embedder: str
    embed_dim: int       # D: width of the face embedding it takes
    tokens: int = 3      # K: Face0 overrides the last three tokens
    context_dim: int = 768  # W: the base model's cross-attention context width
    hidden: int = 768    # Face0: width 768
    base_model: str = "sd1"
    embed_normalized: bool | None = None  # None: not recorded
    extra: dict = field(default_factory=dict)  # other metadata, kept on save
    depth: int = 4       # Face0: a 4-layer feed-forward network (Linear layers; ReLU after all but the last)

    def __post_init__(self):
        if min(self.embed_dim, self.tokens, self.context_dim, self.hidden, self.depth) < 1:
            raise ValueError(f"ProjectionInfo: embed_dim, tokens, context_dim, hidden and depth must be >= 1; got "
                             f"D={self.embed_dim}, K={self.tokens}, W={self.context_dim}, hidden={self.hidden}, "
                             f"depth={self.depth}")

    @property
    def parameters(self) -> int:
        return parameter_count(self.embed_dim, self.hidden, self.depth, self.tokens, self.context_dim)

    def to_metadata(self) -> dict[str, str]:
        meta = {"facecond.kind": KIND, "format_version": FORMAT_VERSION, "embedder": self.embedder,
                "embed_dim": str(self.embed_dim), "tokens": str(self.tokens), "context_dim": str(self.context_dim),
                "hidden": str(self.hidden), "depth": str(self.depth), "base_model": self.base_model}
        if self.embed_normalized is not None:
            meta["embed_normalized"] = "true" if self.embed_normalized else "false"
        if self.extra:
            meta["extra"] = json.dumps(self.extra, sort_keys=True)
        return meta

    @classmethod
    def from_metadata(cls, meta: dict[str, str], where: str) -> ProjectionInfo:
        packfile.require_kind(where, meta, KIND)
        try:
            norm = meta.get("embed_normalized")
            return cls(embedder=meta["embedder"], embed_dim=int(meta["embed_dim"]), tokens=int(meta["tokens"]),
                       context_dim=int(meta["context_dim"]), hidden=int(meta.get("hidden", 768)),
                       depth=int(meta.get("depth", 4)),
                       base_model=meta.get("base_model", "unknown"),
                       embed_normalized=None if norm is None else norm == "true",
                       extra=json.loads(meta.get("extra", "{}")))
        except (KeyError, ValueError) as e:
            raise ValueError(f"{where}: malformed Face0 projection metadata ({e!r})") from None


class Face0Projection(nn.Module):
    """(N, D) face embeddings → (N, K, W) context tokens. ``depth`` Linear layers (Face0: 4), a ReLU after every
    hidden one: D -> h -> ... -> h -> K·W."""

    def __init__(self, info: ProjectionInfo):
        super().__init__()
        self.info = info
        widths = [info.embed_dim] + [info.hidden] * (info.depth - 1) + [info.tokens * info.context_dim]
        layers: list[nn.Module] = []
        for i in range(info.depth):
            layers.append(nn.Linear(widths[i], widths[i + 1]))
            if i < info.depth - 1:
                layers.append(nn.ReLU())
        self.mlp = nn.Sequential(*layers)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        out = self.mlp(embeds)  # (N, K·W)
        return out.view(embeds.shape[0], self.info.tokens, self.info.context_dim)  # (N, K, W)


def face_tokens(proj: Face0Projection, embeds: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
    """Tokens for the context: ``proj(e)`` per row, and zeros where the row is all zeros or ``drop`` is True.

    embeds: (N, D); drop: optional (N,) bool (a trainer's 10% face dropout). Returns (N, K, W) float32.
    """
    p = next(proj.parameters())
    e = embeds.to(device=p.device, dtype=p.dtype)
    no_face = (e == 0).all(dim=1)  # (N,)
    if drop is not None:
        no_face = no_face | drop.to(no_face.device)
    tokens = proj(e)
    return torch.where(no_face[:, None, None], torch.zeros_like(tokens), tokens).float()


def random_projection(info: ProjectionInfo, seed: int = 0) -> Face0Projection:
    """A freshly initialised (untrained) projection, seeded: for tests and as a trainer's starting point."""
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        proj = Face0Projection(info)
    finally:
        torch.random.set_rng_state(gen_state)
    return proj.eval()


def save_projection(proj: Face0Projection, path: str | os.PathLike) -> None:
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in proj.state_dict().items()}
    save_file(state, str(path), metadata=proj.info.to_metadata())


def load_projection(path: str | os.PathLike) -> Face0Projection:
    """Load a projection file; D, K, W and the hidden width come from the metadata and must match the tensors.
    Any unreadable file raises ``packfile.PackFileError`` (a ValueError) with the path, the problem and the fix."""
    meta, state = packfile.read(path, kind=KIND)
    try:
        info = ProjectionInfo.from_metadata(meta, f"Face0 projection {os.path.basename(str(path))}")
    except ValueError as e:
        raise packfile.metadata_error(path, str(e).split(": ", 1)[-1], kind=KIND) from None
    proj = Face0Projection(info)
    expected = {k: tuple(v.shape) for k, v in proj.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if expected != found:
        raise packfile.shape_error(path, expected, found, kind=KIND,
                                   what=f"the tensors do not match its metadata (D={info.embed_dim}, "
                                   f"K={info.tokens}, W={info.context_dim}, hidden={info.hidden}, depth={info.depth})")
    proj.load_state_dict({k: v.float() for k, v in state.items()})
    for p in proj.parameters():
        p.requires_grad_(False)
    return proj.eval()


def override_tokens(context: torch.Tensor, tokens: torch.Tensor, chunks: str = "each") -> torch.Tensor:
    """A new context whose last K tokens (of every 77-token chunk, or of the first/last one) are ``tokens``.

    context: (B, 77·n, W), not modified. tokens: (B, K, W), already matched to B. ``chunks``: ``"each"``,
    ``"first"`` or ``"last"``. Returns (B, 77·n, W) in the context's dtype/device.
    """
    b, length, width = context.shape
    k = tokens.shape[1]
    if tokens.shape[0] != b or tokens.shape[2] != width:
        raise ValueError(f"override_tokens: tokens {tuple(tokens.shape)} do not fit context {tuple(context.shape)}")
    n_chunks = length // TOKENS_PER_CHUNK
    if length % TOKENS_PER_CHUNK or n_chunks == 0:
        raise ValueError(f"override_tokens: context length {length} is not a multiple of {TOKENS_PER_CHUNK}")
    if chunks == "each":
        which = range(n_chunks)
    elif chunks == "first":
        which = [0]
    elif chunks == "last":
        which = [n_chunks - 1]
    else:
        raise ValueError(f"override_tokens: chunks must be 'each', 'first' or 'last', got {chunks!r}")
    out = context.clone()
    t = tokens.to(device=context.device, dtype=context.dtype)
    for i in which:
        end = (i + 1) * TOKENS_PER_CHUNK
        out[:, end - k:end, :] = t
    return out
