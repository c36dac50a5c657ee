"""IP-Adapter (Ye et al. 2023, "IP-Adapter: Text Compatible Image Prompt Adapter for Text-to-Image Diffusion Models",
arXiv 2308.06721) in plain torch: loading the public SD1.5 and SDXL files (variants: ``variants.py``, projection
modules: ``projections.py``), the decoupled
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

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..weights import packfile, packmeta
from ..weights.manifest import load_state_dict
from ..weights.packfile import clip
from .lora import lora_weights
from .projections import FullProj, LinearProj, ProjPlus, Resampler
from .regions import chunk_windows, layer_grid, window_mask
from .variants import INPUT_KINDS, MAX_DEPTH, MAX_LAYERS, MAX_TOKENS, MAX_WIDTH, SUPPORTED, Variant, detect_variant
from .variants import unsupported as unsupported_layout

__all__ = ["INPUT_KINDS", "MAX_DEPTH", "MAX_LAYERS", "MAX_TOKENS", "MAX_WIDTH", "FullProj", "LinearProj", "ProjPlus",
           "Resampler", "Variant", "detect_variant"]

KV_ATTR = "facecond_kv"  # a model manager may register the W'_k, W'_v on `proj` under this name (one module to move)
LABEL, WRITER = "IP-Adapter file", "its publisher (h94/IP-Adapter on Hugging Face)"


@dataclass(frozen=True)
class IPAdapter:
    """A loaded IP-Adapter: its projection and the per-cross-attention W'_k, W'_v (index n = n-th layer)."""

    variant: Variant
    proj: torch.nn.Module
    kv: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    name: str = ""
    lora: dict = field(default_factory=dict, compare=False)  # FaceID: ``<n>.to_q_lora.down.weight``... (lora.py)

    @torch.no_grad()
    def image_tokens(self, embeds: torch.Tensor, clip: torch.Tensor | None = None, s_scale: float = 1.0
                     ) -> torch.Tensor:
        """(N, D) or (N, T, D) reference embeddings -> (N, tokens, cross_dim) image tokens c_i (float32). FaceID
        Plus: ``embeds`` the (N, 512) face embeddings and ``clip`` the (N, T, clip_dim) CLIP hidden states of the
        face crops; v2 adds the shortcut with ``s_scale`` (``projections.ProjPlus``). Computed in the weights'
        dtype (ComfyUI's model dtype)."""
        p = next(self.proj.parameters())
        x = embeds.to(p.device, p.dtype)
        if isinstance(self.proj, ProjPlus):
            if clip is None or clip.ndim != 3 or clip.shape[0] not in (1, x.shape[0]) \
                    or clip.shape[-1] != self.variant.clip_dim:
                raise ValueError(f"{self.name}: {self.variant.title} takes the CLIP hidden states (N, T, "
                                 f"{self.variant.clip_dim}) of the face crops beside the face embeddings")
            return self.proj(x, clip.to(p.device, p.dtype).expand(x.shape[0], -1, -1),
                             shortcut=self.variant.name == "faceid_plusv2", scale=float(s_scale)).float()
        return self.proj(x).float()

    def negative_tokens(self, embeds: torch.Tensor, clip_neg: torch.Tensor | None = None,
                        s_scale: float = 1.0) -> torch.Tensor:
        """The unconditional image tokens: the projection of a zero embedding (IP-Adapter's CFG 'no image'); FaceID
        Plus: a zero face embedding with the CLIP hidden states of a zero image (``clip_neg``), as the authors'
        ``IPAdapterFaceIDPlus.get_image_embeds``."""
        return self.image_tokens(torch.zeros_like(embeds[:1]), clip_neg, s_scale)

    def resident_bytes(self) -> int:
        """Bytes held by the adapter's tensors (projection, W'_k/W'_v, LoRA), each storage counted once."""
        seen, total = set(), 0
        tensors = [*self.proj.parameters(), *self.proj.buffers(), *(t for pair in self.kv for t in pair),
                   *self.lora.values()]
        for t in tensors:
            st = t.untyped_storage()
            if st.data_ptr() not in seen:
                seen.add(st.data_ptr())
                total += st.nbytes()
        return total


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


def _resampler_depth(proj: dict[str, torch.Tensor], name: str, prefix: str = "") -> None:
    idx = {k[len(prefix):].split(".")[1] for k in proj if k.startswith(prefix + "layers.")}
    need = {f"{prefix}layers.0.0.to_q.weight", f"{prefix}layers.0.1.1.weight"}
    if not idx or not all(i.isdigit() and len(i) <= 3 for i in idx) or max(map(int, idx)) >= MAX_DEPTH \
            or not need <= proj.keys():
        raise ValueError(f"{name}: the Resampler's layers {clip(sorted(idx)[:6])} are not numbered 0..n-1 with "
                         f"n <= {MAX_DEPTH} ({prefix}layers.0.0.to_q / layers.0.1.1 present); the file is damaged")


def _projection(proj: dict[str, torch.Tensor], v: Variant, name: str):
    if v.name == "plus":
        _resampler_depth(proj, name)
        return lambda: Resampler(proj, v)
    if v.input_kind == "face+clip_hidden":
        _resampler_depth(proj, name, ProjPlus.PREFIX)
        return lambda: ProjPlus(proj, v)
    if v.name == "full":
        return lambda: FullProj(v)
    return lambda: LinearProj(v)


def from_state_dict(sd: dict[str, torch.Tensor], name: str = "", dtype: torch.dtype | None = None) -> IPAdapter:
    """The adapter of a flat state dict, its tensors (projection, W'_k/W'_v, LoRA) in ``dtype`` (float32 by default;
    the nodes pass ComfyUI's model dtype). The modules are built on the meta device and their shapes compared with
    the tensors' before the tensors are assigned (so meta-device stand-ins check a file without reading it)."""
    dtype = torch.float32 if dtype is None else dtype
    proj = {k[len("image_proj."):]: v for k, v in sd.items() if k.startswith("image_proj.")}
    known = unsupported_layout(sd, proj)
    if known:
        raise ValueError(f"{name or 'IP-Adapter'}: this is a {known[0]} file, which facecond does not load ({known[1]}"
                         f"); {SUPPORTED}.")
    if not proj or not any(k.startswith("ip_adapter.") for k in sd):
        raise ValueError(f"{name or 'IP-Adapter'}: not an IP-Adapter file (needs image_proj.* and ip_adapter.* keys)")
    lora = lora_weights(sd)
    v = detect_variant(proj, has_lora=bool(lora), file_name=name)
    module = packmeta.build(name, _projection(proj, v, name), proj, dtype=dtype, label=LABEL, writer=WRITER,
                            what=f"its image projection does not have the shapes of an {v.title} projection")
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
        kv.append(tuple(t.to(dtype, copy=True) for t in pair))
    lora = {k: t.to(dtype, copy=True) for k, t in lora.items()}
    return IPAdapter(v, module.eval().requires_grad_(False), tuple(kv), name, lora)


def load(path: str | Path, dtype: torch.dtype | None = None) -> IPAdapter:
    return from_state_dict(read_file(path), Path(path).name, dtype)


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
    c, c_neg = c.to(adapter.kv[0][0].device), c_neg.float().to(adapter.kv[0][0].device)
    out = []
    for pair in adapter.kv:  # K' = c W'_k in float32 whatever dtype the weights are kept in
        wk, wv = (w.float().T for w in pair)
        out.append(IPTerm(c @ wk, c @ wv, c_neg @ wk, c_neg @ wv, float(weight), float(sigma_start),
                          float(sigma_end), mask))
    return out
