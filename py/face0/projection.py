"""Face0's projection: a face embedding → K context tokens that override the end of the text context.

Face0 (Valevski et al. 2023, §3.1): a 4-layer feed-forward network of width 768 with a ReLU after every
hidden layer maps the face embedding to three 768-d vectors that replace tokens 75-77 of Stable
Diffusion's 77-token CLIP context. It is trained jointly with the U-Net; 10% of the time the *projected*
embedding is set to zero so that the model learns a "no face" input for guidance.

Placement at sampling time (:func:`place_face_tokens`): the paper's positions where they are padding, never over a
prompt token or the end-of-text token; a prompt that leaves no padding there keeps its tokens and the face goes into
an added 77-token chunk (the empty prompt's encoding with the face at 75-77). Training uses :func:`override_tokens`,
the paper's rule (one-chunk captions).

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

from ..weights import packfile, packmeta
from ..weights.atomic import save_file

KIND = "face0_projection"
FORMAT_VERSION = "1"
# Context width of the cross-attention text context for each base-model family (Face0 targets SD1.x).
CONTEXT_DIMS = {"sd1": 768, "sd2": 1024, "sdxl": 2048}
TOKENS_PER_CHUNK = 77  # CLIP context length; ComfyUI concatenates 77-token chunks of BOS + up to 75 prompt tokens
# + EOS + padding (comfy/sd1_clip.py, SDTokenizer.tokenize_with_weights)
# Projection shapes (hidden width h, Linear layers L). "small": the paper's stated width 768 (3.35M parameters at
# D = 512); "paper": its stated size, ~10M (see the module docstring for why the width differs).
PRESETS = {"small": {"hidden": 768, "depth": 4}, "paper": {"hidden": 1536, "depth": 4}}
# Bounds on the metadata numbers of a file (checked before anything is built; README "Limits"): the largest file
# they allow holds ~1.1G parameters, and its tensors must be in the file for it to load.
BOUNDS = {"embed_dim": (1, 8192), "tokens": (1, TOKENS_PER_CHUNK), "context_dim": (1, 8192), "hidden": (1, 8192),
          "depth": (1, 16)}
DEFAULTS = {"hidden": 768, "depth": 4}  # files written before these keys existed


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
    def from_metadata(cls, meta: dict[str, str], where: str | os.PathLike) -> ProjectionInfo:
        """The facts of a projection file's metadata, every number within ``BOUNDS`` (checked before anything is
        built: a file cannot make the loader allocate more than its bounded shapes); ``packfile.PackFileError``
        ("bad_metadata") naming the key, the bounds and the value (clipped) otherwise."""
        packfile.require_kind(where, meta, KIND)
        n = {k: packmeta.meta_int(where, meta, k, lo, hi, default=DEFAULTS.get(k), kind=KIND)
             for k, (lo, hi) in BOUNDS.items()}
        extra = packmeta.meta_json(where, meta, "extra", lambda v: isinstance(v, dict), "a JSON object",
                                   kind=KIND) if "extra" in meta else {}
        norm = meta.get("embed_normalized")
        return cls(embedder=packmeta.meta_text(where, meta, "embedder", kind=KIND), **n,
                   base_model=packmeta.meta_text(where, meta, "base_model", default="unknown", kind=KIND),
                   embed_normalized=None if norm is None else norm == "true", extra=extra)


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
    """Load a projection file; D, K, W, the hidden width and depth come from the metadata (within ``BOUNDS``) and
    the tensor shapes they call for are compared with the file's header before any tensor is read or any module
    built. Any unusable file (also: NaN/inf or non-float weights) raises ``packfile.PackFileError`` (a ValueError)
    with the path, the problem and the fix."""
    facts: list[ProjectionInfo] = []

    def what(info):
        return (f"the tensors do not match its metadata (D={info.embed_dim}, K={info.tokens}, W={info.context_dim}, "
                f"hidden={info.hidden}, depth={info.depth})")

    def plan(meta, specs):
        facts.append(ProjectionInfo.from_metadata(meta, path))
        packmeta.build(path, lambda: Face0Projection(facts[0]), packmeta.meta_tensors(specs), what=what(facts[0]),
                       kind=KIND)

    _, state = packfile.read(path, kind=KIND, plan=plan)
    proj = packmeta.build(path, lambda: Face0Projection(facts[0]), state, what=what(facts[0]), kind=KIND)
    return proj.eval().requires_grad_(False)


def _chunk_indices(where: str, chunks: str, n_chunks: int) -> list[int]:
    if chunks == "each":
        return list(range(n_chunks))
    if chunks == "first":
        return [0]
    if chunks == "last":
        return [n_chunks - 1]
    raise ValueError(f"{where}: chunks must be 'each', 'first' or 'last', got {chunks!r}")


def _check_fit(where: str, context: torch.Tensor, tokens: torch.Tensor) -> int:
    """Number of 77-token chunks of ``context`` (B, 77·n, W); ``tokens`` must be (B, K, W)."""
    b, length, width = context.shape
    if tokens.shape[0] != b or tokens.shape[2] != width:
        raise ValueError(f"{where}: tokens {tuple(tokens.shape)} do not fit context {tuple(context.shape)}")
    if length % TOKENS_PER_CHUNK or length == 0:
        raise ValueError(f"{where}: context length {length} is not a multiple of {TOKENS_PER_CHUNK}")
    return length // TOKENS_PER_CHUNK


def override_tokens(context: torch.Tensor, tokens: torch.Tensor, chunks: str = "each") -> torch.Tensor:
    """A new context whose last K tokens (of every 77-token chunk, or of the first/last one) are ``tokens``.

    The paper's rule, used in training (captions are one chunk there). It overwrites whatever those positions
    hold; at sampling time :func:`place_face_tokens` uses it only where they hold padding.
    context: (B, 77·n, W), not modified. tokens: (B, K, W), already matched to B. ``chunks``: ``"each"``,
    ``"first"`` or ``"last"``. Returns (B, 77·n, W) in the context's dtype/device.
    """
    n_chunks = _check_fit("override_tokens", context, tokens)
    which = _chunk_indices("override_tokens", chunks, n_chunks)
    k = tokens.shape[1]
    out = context.clone()
    t = tokens.to(device=context.device, dtype=context.dtype)
    for i in which:
        end = (i + 1) * TOKENS_PER_CHUNK
        out[:, end - k:end, :] = t
    return out


def prompt_ends(context: torch.Tensor, pooled: torch.Tensor | None) -> list[int | None]:
    """Per 77-token chunk of a CLIP text context, the position of the chunk's end-of-text token, or None where the
    context does not show it.

    A text context carries no token count and no mask, and its padding cannot be recognised by comparing with the
    empty prompt's encoding: CLIP's attention is causal, so every pad's output depends on the whole prompt before
    it. One exact fact is there: the pooled output is the final layer's state at the first EOS of the first chunk
    (ComfyUI comfy/clip_model.py, ``CLIPTextModel_.forward``: ``x[arange, argmax(tokens == eos)]``; and
    comfy/sd1_clip.py, ``ClipTokenWeightEncoder.encode_token_weights``: ``first_pooled = pooled[0:1]``). Where the
    context *is* that final layer (SD1.x at the default CLIP layer) the first-chunk row equal to it is the EOS.
    SD1.x with CLIP skip, SD2.x (penultimate layer) and SDXL (CLIP-G's projected pooled output) show nothing, and
    no chunk after the first does: None there.

    context: (B, 77·n, W); pooled: (B or 1, W') or None. The end of chunk 0 is the latest over the B rows, None if
    any row has no match. Returns a list of n entries.
    """
    n_chunks = context.shape[1] // TOKENS_PER_CHUNK
    ends: list[int | None] = [None] * n_chunks
    b, _, width = context.shape
    if pooled is None or pooled.ndim != 2 or pooled.shape[1] != width or pooled.shape[0] not in (1, b):
        return ends
    first = context[:, :TOKENS_PER_CHUNK]
    hits = (first == pooled.to(device=first.device, dtype=first.dtype)[:, None, :]).all(dim=-1)  # (B, 77)
    hits[:, 0] = False  # position 0 is BOS
    if hits.any(dim=1).all():
        ends[0] = int(hits.int().argmax(dim=1).max())  # argmax: the first matching position of each row
    return ends


def place_face_tokens(context: torch.Tensor, tokens: torch.Tensor, chunks: str, ends: list[int | None],
                      empty_chunk: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Put the face into a text context without overwriting a prompt token or an end-of-text token.

    Each chunk that ``chunks`` names (``"each"``, ``"first"``, ``"last"``) gets the face at its last K positions,
    the paper's tokens 75-77, when they are padding: its EOS position ``ends[i]`` is known and before them. That is
    :func:`override_tokens`, bit for bit, so prompts of up to 77 - K - 2 tokens (72 for K = 3) are placed as in
    the paper. Any other named chunk (the prompt fills it, or its end is unknown) is left whole, and the face goes
    into an added chunk appended after the prompt: ``empty_chunk`` (the empty prompt's encoding: BOS, EOS,
    padding) with the face at its tokens 75-77, the face-only context of training. ComfyUI concatenates chunks the
    same way (comfy/sd1_clip.py, ``encode_token_weights``: ``torch.cat(output, dim=-2)``); cross-attention has no
    position over the context, so where the added chunk sits does not matter to the U-Net.

    context: (B, 77·n, W) and empty_chunk: (1 or B, 77, W), not modified; tokens: (B, K, W); ends: n entries (from
    :func:`prompt_ends`). Returns (the new context (B, 77·(n + m), W), m the number of added chunks).
    """
    n_chunks = _check_fit("place_face_tokens", context, tokens)
    which = _chunk_indices("place_face_tokens", chunks, n_chunks)
    if len(ends) != n_chunks:
        raise ValueError(f"place_face_tokens: {len(ends)} ends given; need one end per 77-token chunk ({n_chunks})")
    b, _, width = context.shape
    k = tokens.shape[1]
    if empty_chunk.ndim != 3 or empty_chunk.shape[0] not in (1, b) or empty_chunk.shape[1:] != (TOKENS_PER_CHUNK,
                                                                                                  width):
        raise ValueError(f"place_face_tokens: empty_chunk {tuple(empty_chunk.shape)} is not one 77-token chunk of "
                         f"width {width} (batch 1 or {b})")
    if k > TOKENS_PER_CHUNK - 2:
        raise ValueError(f"place_face_tokens: {k} face tokens do not fit after BOS and EOS of a 77-token chunk")
    room = [i for i in which if ends[i] is not None and ends[i] < TOKENS_PER_CHUNK - k]
    out = context.clone()
    t = tokens.to(device=context.device, dtype=context.dtype)
    for i in room:
        end = (i + 1) * TOKENS_PER_CHUNK
        out[:, end - k:end, :] = t
    added = len(which) - len(room)
    if added:
        face_chunk = empty_chunk.to(device=context.device, dtype=context.dtype).expand(b, -1, -1).clone()
        face_chunk[:, TOKENS_PER_CHUNK - k:, :] = t
        out = torch.cat([out] + [face_chunk] * added, dim=1)
    return out, added
