"""IP-Adapter (Ye et al. 2023, "IP-Adapter: Text Compatible Image Prompt Adapter for Text-to-Image Diffusion Models",
arXiv 2308.06721) in plain torch: the image-projection modules of the public SD1.5 files, the decoupled
cross-attention, and the attention patch that adds it to each cross-attention of a UNet.

Decoupled cross-attention (paper eq. 5), per cross-attention layer, with the text keys/values K, V and the image
tokens c_i (the projected reference embedding) giving K' = c_i W'_k, V' = c_i W'_v:

    Z = Attention(Q, K, V) + λ · Attention(Q, K', V')

The multi-reference variant (Kazistova, Stepanov, Filatov, "Создание персонализированных генераций изображений"
[Creating personalized image generations], MIPT / Skoltech, undated, after 2023; no arXiv id) aggregates N reference
embeddings into one (``aggregate.py``) before the unchanged projection and attention here.

File layout (``.safetensors`` flat ``image_proj.*`` / ``ip_adapter.*``, or the nested ``.bin`` dicts):
``ip_adapter.{2n+1}.to_k_ip.weight`` / ``to_v_ip.weight`` belong to the n-th cross-attention of the UNet, counting
input blocks, then output blocks, then the middle block (diffusers' processor order). The projection variant is read
from the ``image_proj`` keys and shapes (``detect_variant``). Nothing here imports ComfyUI; the attention function
is injected (ComfyUI's ``optimized_attention``). Random weights in this layout: ``facecond_dev.random_weights``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..weights import packfile, packmeta
from ..weights.manifest import load_state_dict
from ..weights.packfile import clip
from .lora import lora_weights
from .regions import chunk_windows, layer_grid, window_mask

# What each variant consumes: a CLIP image embedding (projected, e.g. 1024 for ViT-H), the CLIP penultimate
# hidden states (257 x 1280 for ViT-H), or a face-recognition embedding (512 for insightface buffalo_l).
INPUT_KINDS = {"plain": "clip_embeds", "plus": "clip_hidden", "faceid": "face"}
KV_ATTR = "facecond_kv"  # a model manager may register the W'_k, W'_v on `proj` under this name (one module to move)


@dataclass(frozen=True)
class Variant:
    name: str  # "plain" | "plus" | "faceid"
    input_dim: int  # width of the embedding the projection takes
    tokens: int  # image tokens it makes
    cross_dim: int  # token width (the UNet's cross-attention context width, 768 for SD1.5)

    @property
    def input_kind(self) -> str:
        return INPUT_KINDS[self.name]


# Bounds on what a file's shapes may declare (README "Limits"; SD1.5 files: 1024-d input, 16 tokens, 768-d tokens,
# a 4-layer Resampler, 16 cross-attention layers): checked before any module is built.
MAX_WIDTH, MAX_TOKENS, MAX_DEPTH, MAX_LAYERS = 8192, 1024, 64, 256
LABEL, WRITER = "IP-Adapter file", "its publisher (h94/IP-Adapter on Hugging Face)"


def detect_variant(proj: dict[str, torch.Tensor]) -> Variant:
    """The projection variant from the ``image_proj`` keys (prefix stripped) and their shapes; ValueError when the
    layout is unknown or its shapes are outside ``MAX_WIDTH``/``MAX_TOKENS``."""
    try:
        v = _variant(proj)
    except (IndexError, ZeroDivisionError):  # a tensor of too few dimensions or a zero width
        v = None
    if v is None:
        raise ValueError(f"unsupported IP-Adapter image projection (keys {clip(sorted(proj)[:8])}...): supported "
                         "are the SD1.5 plain (proj + norm), plus (Resampler: latents, proj_in, layers) and FaceID "
                         "(proj.0/2 + norm) layouts; FaceID-plus and full-face files are not.")
    if not (1 <= v.input_dim <= MAX_WIDTH and 1 <= v.tokens <= MAX_TOKENS and 1 <= v.cross_dim <= MAX_WIDTH):
        raise ValueError(f"IP-Adapter image projection of {v.input_dim}-d input, {v.tokens} tokens of width "
                         f"{v.cross_dim}: outside the sizes the pack loads (widths 1..{MAX_WIDTH}, 1..{MAX_TOKENS} "
                         "tokens); the file is damaged or not an SD IP-Adapter.")
    return v


def _variant(proj: dict[str, torch.Tensor]) -> Variant | None:
    if "latents" in proj and "proj_in.weight" in proj and "proj_out.weight" in proj:  # Resampler (IP-Adapter plus)
        width, tokens = proj["proj_in.weight"].shape[1], proj["latents"].shape[1]
        return Variant("plus", width, tokens, proj["proj_out.weight"].shape[0])
    if "proj.weight" in proj and "norm.weight" in proj:  # Linear + LayerNorm (plain)
        cross = proj["norm.weight"].shape[0]
        return Variant("plain", proj["proj.weight"].shape[1], proj["proj.weight"].shape[0] // cross, cross)
    if {"proj.0.weight", "proj.2.weight", "norm.weight"} <= proj.keys() and "proj.3.weight" not in proj:
        cross = proj["norm.weight"].shape[0]  # MLPProjModel (FaceID): Linear, GELU, Linear, LayerNorm
        return Variant("faceid", proj["proj.0.weight"].shape[1], proj["proj.2.weight"].shape[0] // cross, cross)
    return None


class LinearProj(nn.Module):
    """Plain and FaceID projections: (B, D) -> (B, tokens, cross_dim); FaceID puts a GELU MLP before the norm."""

    def __init__(self, v: Variant):
        super().__init__()
        self.tokens, self.cross_dim = v.tokens, v.cross_dim
        out = v.tokens * v.cross_dim
        if v.name == "faceid":
            d = v.input_dim
            self.proj = nn.Sequential(nn.Linear(d, d * 2), nn.GELU(), nn.Linear(d * 2, out))
        else:
            self.proj = nn.Linear(v.input_dim, out)
        self.norm = nn.LayerNorm(v.cross_dim)

    def forward(self, x):
        return self.norm(self.proj(x).reshape(-1, self.tokens, self.cross_dim))


class PerceiverAttention(nn.Module):
    def __init__(self, dim: int, inner: int, dim_head: int = 64):
        super().__init__()
        self.heads, self.dim_head = inner // dim_head, dim_head
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x, latents):
        x, latents = self.norm1(x), self.norm2(latents)
        b, n, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat((x, latents), dim=-2)).chunk(2, dim=-1)
        q, k, v = (t.reshape(b, -1, self.heads, self.dim_head).transpose(1, 2) for t in (q, k, v))  # (B, h, T, d)
        scale = 1 / math.sqrt(math.sqrt(self.dim_head))
        w = torch.softmax(((q * scale) @ (k * scale).transpose(-2, -1)).float(), dim=-1).to(q.dtype)
        return self.to_out((w @ v).transpose(1, 2).reshape(b, n, -1))


class Resampler(nn.Module):
    """IP-Adapter plus: learned queries (latents) attend to the CLIP hidden states (Perceiver resampler)."""

    def __init__(self, sd: dict[str, torch.Tensor], v: Variant):
        super().__init__()
        dim = sd["latents"].shape[2]
        depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
        inner, hidden = sd["layers.0.0.to_q.weight"].shape[0], sd["layers.0.1.1.weight"].shape[0]
        self.latents = nn.Parameter(torch.zeros(1, v.tokens, dim))
        self.proj_in = nn.Linear(v.input_dim, dim)
        self.proj_out = nn.Linear(dim, v.cross_dim)
        self.norm_out = nn.LayerNorm(v.cross_dim)
        self.layers = nn.ModuleList(nn.ModuleList([
            PerceiverAttention(dim, inner),
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden, bias=False), nn.GELU(),
                          nn.Linear(hidden, dim, bias=False)),
        ]) for _ in range(depth))

    def forward(self, x):
        latents = self.latents.repeat(x.shape[0], 1, 1)
        x = self.proj_in(x)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


@dataclass(frozen=True)
class IPAdapter:
    """A loaded IP-Adapter: its projection and the per-cross-attention W'_k, W'_v (index n = n-th layer)."""

    variant: Variant
    proj: nn.Module
    kv: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    name: str = ""
    lora: dict = field(default_factory=dict, compare=False)  # FaceID: ``<n>.to_q_lora.down.weight``... (lora.py)

    @torch.no_grad()
    def image_tokens(self, embeds: torch.Tensor) -> torch.Tensor:
        """(N, D) or (N, T, D) reference embeddings -> (N, tokens, cross_dim) image tokens c_i (float32)."""
        p = next(self.proj.parameters())
        return self.proj(embeds.to(p.device, p.dtype)).float()

    def negative_tokens(self, embeds: torch.Tensor) -> torch.Tensor:
        """The unconditional image tokens: the projection of a zero embedding (IP-Adapter's CFG 'no image')."""
        return self.image_tokens(torch.zeros_like(embeds[:1]))


def read_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Flat ``image_proj.*`` / ``ip_adapter.*`` tensors of a .safetensors or a .bin (nested dicts, weights_only).
    Before the tensor data is read, the layout is checked on meta-device stand-ins (``from_state_dict``); float16,
    bfloat16 and float32 tensors only, all finite (``packfile.PackFileError`` otherwise)."""
    def plan(_meta, specs):
        from_state_dict(packmeta.meta_tensors(specs), Path(path).name)

    # a file written by scripts/train_aggregator.py --train adapter also holds its aggregator, whose n_refs and heads
    # are integers (py/ipadapter/aggregate.py FILE_PREFIX)
    ints = {f"aggregator.{k}": packfile.INT_DTYPES for k in ("n_refs", "heads")}
    return load_state_dict(path, LABEL, WRITER, dtypes=ints, plan=plan)


def _resampler_depth(proj: dict[str, torch.Tensor], name: str) -> None:
    idx = {k.split(".")[1] for k in proj if k.startswith("layers.")}
    if not idx or not all(i.isdigit() and len(i) <= 3 for i in idx) or max(map(int, idx)) >= MAX_DEPTH \
            or not {"layers.0.0.to_q.weight", "layers.0.1.1.weight"} <= proj.keys():
        raise ValueError(f"{name}: the Resampler's layers {clip(sorted(idx)[:6])} are not numbered 0..n-1 with "
                         f"n <= {MAX_DEPTH} (layers.0.0.to_q / layers.0.1.1 present); the file is damaged")


def from_state_dict(sd: dict[str, torch.Tensor], name: str = "") -> IPAdapter:
    """The adapter of a flat state dict. The modules are built on the meta device and their shapes compared with
    the tensors' before the tensors are assigned (so meta-device stand-ins check a file without reading it)."""
    proj = {k[len("image_proj."):]: v for k, v in sd.items() if k.startswith("image_proj.")}
    if not proj or not any(k.startswith("ip_adapter.") for k in sd):
        raise ValueError(f"{name or 'IP-Adapter'}: not an IP-Adapter file (needs image_proj.* and ip_adapter.* keys)")
    v = detect_variant(proj)
    if v.name == "plus":
        _resampler_depth(proj, name)
    module = packmeta.build(name, (lambda: Resampler(proj, v)) if v.name == "plus" else (lambda: LinearProj(v)), proj,
                            what=f"its image projection does not have the shapes of an IP-Adapter {v.name} "
                            "projection", label=LABEL, writer=WRITER)
    ids = sorted({int(k.split(".")[1]) for k in sd if k.startswith("ip_adapter.") and k.endswith(".to_k_ip.weight")
                  and k.split(".")[1].isdigit() and len(k.split(".")[1]) <= 4})
    if not ids or ids != list(range(1, 2 * len(ids), 2)) or len(ids) > MAX_LAYERS:
        raise ValueError(f"{name}: ip_adapter layers {ids[:6]}... are not numbered 1, 3, 5, ... (diffusers order; "
                         f"at most {MAX_LAYERS})")
    kv = []
    for i in ids:
        pair = tuple(sd.get(f"ip_adapter.{i}.to_{x}_ip.weight") for x in "kv")
        if any(t is None or t.ndim != 2 or t.shape[1] != v.cross_dim or not 1 <= t.shape[0] <= MAX_WIDTH
               for t in pair):
            raise ValueError(f"{name}: ip_adapter.{i}.to_k_ip / to_v_ip must be (inner, {v.cross_dim}) weights with "
                             f"inner <= {MAX_WIDTH}; found {[None if t is None else tuple(t.shape) for t in pair]}")
        kv.append(tuple(t.to(torch.float32, copy=True) for t in pair))
    return IPAdapter(v, module.eval().requires_grad_(False), tuple(kv), name, lora_weights(sd))


def load(path: str | Path) -> IPAdapter:
    return from_state_dict(read_file(path), Path(path).name)


# --- attention -------------------------------------------------------------------------------------------
AttentionFn = Callable[..., torch.Tensor]  # (q, k, v, heads, **kw) -> (B, T, heads*d), ComfyUI's layout


def sdpa(q, k, v, heads, **_):
    """softmax(QKᵀ/√d)V per head, tensors (B, T, heads*d) as ComfyUI hands them to attention functions."""
    b, _, c = q.shape
    q, k, v = (t.reshape(b, -1, heads, c // heads).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, c)


# --- the UNet patch ----------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class IPTerm:
    """One adapter applied at one cross-attention: K' = c_i W'_k, V' = c_i W'_v precomputed (float32, CPU) for
    the reference (``k``, ``v``: (1, tokens, inner)) and the unconditional image (``k_neg``, ``v_neg``)."""

    k: torch.Tensor
    v: torch.Tensor
    k_neg: torch.Tensor
    v_neg: torch.Tensor
    weight: float
    sigma_start: float  # active while sigma_end <= sigma <= sigma_start
    sigma_end: float
    mask: torch.Tensor | None = None  # (1 or B, H, W) in [0, 1] over the full image: where the term applies
    cache: dict = None  # device/dtype/batch copies, filled on use (derived data only)

    def __post_init__(self):
        object.__setattr__(self, "cache", {})

    def active(self, sigma: float) -> bool:
        return self.weight != 0 and self.sigma_end <= sigma <= self.sigma_start

    def kv(self, cond_or_uncond: tuple, rows: int, like: torch.Tensor):
        """K', V' for a batch of ``len(cond_or_uncond)`` chunks of ``rows`` rows (0 = cond, 1 = uncond)."""
        key = (cond_or_uncond, rows, like.device, like.dtype)
        if key not in self.cache:
            ks = [(self.k_neg if c == 1 else self.k).expand(rows, -1, -1) for c in cond_or_uncond]
            vs = [(self.v_neg if c == 1 else self.v).expand(rows, -1, -1) for c in cond_or_uncond]
            self.cache[key] = tuple(torch.cat(t).to(like.device, like.dtype) for t in (ks, vs))
        return self.cache[key]

    def mask_tokens(self, hw: tuple[int, int], windows: tuple, rows: int, like: torch.Tensor):
        """The mask under each chunk's latent window (whole latent or an area conditioning's area, see
        ``regions.py``) on the layer's (h, w) grid: (chunks*rows, h*w, 1)."""
        key = ("mask", hw, windows, rows, like.device, like.dtype)
        if key not in self.cache:
            m = window_mask(self.mask, windows, hw, rows)
            self.cache[key] = m.to(like.device, like.dtype)
        return self.cache[key]


_SIGMA: list = [None, 0.0]  # the sigmas tensor of the current model call and its value (held: no id reuse)


class IPAttentionPatch:
    """An ``attn2`` replace patch (ComfyUI's ``set_model_attn2_replace``): the decoupled cross-attention
    Z = Attention(Q, K, V) + λ·Attention(Q, K', V') (Ye et al. 2023, eq. 5), with the base attention — or the patch
    that was there before (stacking) — plus the image term of each active term, gated by its mask. Immutable:
    stacking builds a new patch; deep copies (ComfyUI clones model_options) share it."""

    def __init__(self, terms: tuple[IPTerm, ...], previous: Callable | None = None, attention: AttentionFn = sdpa):
        self.terms, self.previous, self.attention = tuple(terms), previous, attention

    def __deepcopy__(self, memo):
        return self

    def with_term(self, term: IPTerm) -> IPAttentionPatch:
        return IPAttentionPatch((*self.terms, term), self.previous, self.attention)

    @staticmethod
    def sigma(extra_options: dict) -> float:
        """The step's sigma as a float: one device sync per step, shared by every layer's patch."""
        s = extra_options.get("sigmas")
        if s is None:
            return 0.0
        if _SIGMA[0] is not s:  # samplers make a new sigma tensor for every model call
            _SIGMA[:] = [s, float(s.max())]
        return _SIGMA[1]

    def __call__(self, q, k, v, extra_options):
        heads = extra_options["n_heads"]
        kw = {"attn_precision": extra_options.get("attn_precision"), "transformer_options": extra_options}
        out = self.previous(q, k, v, extra_options) if self.previous is not None else \
            self.attention(q, k, v, heads, **kw)
        sigma = self.sigma(extra_options)
        live = [t for t in self.terms if t.active(sigma)]
        if not live:  # outside every window: exactly the base attention
            return out
        cond_or_uncond = tuple(extra_options.get("cond_or_uncond") or (0,))
        chunks = len(cond_or_uncond)
        rows = q.shape[0] // chunks
        windows = chunk_windows(extra_options, chunks) if any(t.mask is not None for t in live) else None
        for t in live:
            k_ip, v_ip = t.kv(cond_or_uncond, rows, q)
            extra = self.attention(q, k_ip, v_ip, heads, **kw)
            if t.mask is not None:
                extra = extra * t.mask_tokens(layer_grid(q.shape[1], extra_options), windows, rows, q)
            out = out + extra * t.weight
        return out


def layer_terms(adapter: IPAdapter, tokens: torch.Tensor, negative: torch.Tensor, weight: float,
                sigma_start: float, sigma_end: float, mask: torch.Tensor | None) -> list[IPTerm]:
    """One IPTerm per cross-attention layer; tokens (N, T, C) are concatenated along T (N references side by side)."""
    c = tokens.reshape(1, -1, tokens.shape[-1]).float()
    c_neg = negative.reshape(1, -1, negative.shape[-1]).expand(tokens.shape[0], -1, -1).reshape(1, -1, c.shape[-1])
    return [IPTerm(c @ wk.T, c @ wv.T, c_neg.float() @ wk.T, c_neg.float() @ wv.T, float(weight), float(sigma_start),
                   float(sigma_end), mask) for wk, wv in adapter.kv]
