"""The image-projection modules of the public IP-Adapter files (Ye et al. 2023, arXiv 2308.06721), written after the
authors' reference code (tencent-ailab/IP-Adapter: ``ip_adapter/ip_adapter.py`` ImageProjModel / MLPProjModel,
``ip_adapter/resampler.py`` Resampler, ``ip_adapter/ip_adapter_faceid.py`` MLPProjModel / ProjPlusModel /
FacePerceiverResampler). Module and parameter names follow the files' ``image_proj.*`` keys. Variants: ``variants.py``.

- plain: ``norm(proj(x))``, x a CLIP image embedding (B, D) -> (B, tokens, C).
- full (full-face): ``Linear, GELU, Linear, LayerNorm`` on each CLIP penultimate hidden state (B, T, D) -> (B, T, C).
- plus: a perceiver resampler, learned queries over the CLIP penultimate hidden states.
- FaceID / FaceID Portrait: ``norm(MLP(e))``, e an insightface embedding (B, 512), MLP = Linear(d, 2d), GELU,
  Linear(2d, tokens·C).
- FaceID Plus / Plus v2 (``ProjPlusModel``): the FaceID tokens x = norm(MLP(e)) are the queries of a perceiver
  resampler over the CLIP hidden states h of the aligned face crop, ``out = resampler(x, h)``; v2 adds the shortcut
  ``out = x + s_scale · resampler(x, h)`` (``shortcut=True, scale=s_scale`` in the authors' ``get_image_embeds``).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LinearProj(nn.Module):
    """Plain and FaceID projections: (B, D) -> (B, tokens, cross_dim); FaceID puts a GELU MLP before the norm."""

    def __init__(self, v):
        super().__init__()
        self.tokens, self.cross_dim = v.tokens, v.cross_dim
        out = v.tokens * v.cross_dim
        if v.face_mlp:
            d = v.input_dim
            self.proj = nn.Sequential(nn.Linear(d, d * 2), nn.GELU(), nn.Linear(d * 2, out))
        else:
            self.proj = nn.Linear(v.input_dim, out)
        self.norm = nn.LayerNorm(v.cross_dim)

    def forward(self, x):
        return self.norm(self.proj(x).reshape(-1, self.tokens, self.cross_dim))


class FullProj(nn.Module):
    """Full-face (``ip_adapter.py`` MLPProjModel): each of the T hidden states -> one token, (B, T, D) -> (B, T, C)."""

    def __init__(self, v):
        super().__init__()
        d = v.input_dim
        self.proj = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, v.cross_dim), nn.LayerNorm(v.cross_dim))

    def forward(self, x):
        return self.proj(x)


class PerceiverAttention(nn.Module):
    """``resampler.py`` PerceiverAttention: the latents attend to [x; latents], heads of 64 channels."""

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


def _layers(sd: dict[str, torch.Tensor], dim: int, prefix: str = "") -> nn.ModuleList:
    """The resampler's attention + feed-forward layers (``layers.<i>.0`` / ``layers.<i>.1.{0,1,3}``)."""
    depth = 1 + max(int(k[len(prefix):].split(".")[1]) for k in sd if k.startswith(prefix + "layers."))
    inner, hidden = sd[f"{prefix}layers.0.0.to_q.weight"].shape[0], sd[f"{prefix}layers.0.1.1.weight"].shape[0]
    return nn.ModuleList(nn.ModuleList([
        PerceiverAttention(dim, inner),
        nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden, bias=False), nn.GELU(),
                      nn.Linear(hidden, dim, bias=False)),
    ]) for _ in range(depth))


def _run_layers(layers: nn.ModuleList, x, latents):
    for attn, ff in layers:
        latents = attn(x, latents) + latents
        latents = ff(latents) + latents
    return latents


class Resampler(nn.Module):
    """IP-Adapter plus: learned queries (latents) attend to the CLIP hidden states (Perceiver resampler)."""

    def __init__(self, sd: dict[str, torch.Tensor], v):
        super().__init__()
        dim = sd["latents"].shape[2]
        self.latents = nn.Parameter(torch.zeros(1, v.tokens, dim))
        self.proj_in = nn.Linear(v.input_dim, dim)
        self.proj_out = nn.Linear(dim, v.cross_dim)
        self.norm_out = nn.LayerNorm(v.cross_dim)
        self.layers = _layers(sd, dim)

    def forward(self, x):
        latents = self.latents.repeat(x.shape[0], 1, 1)
        return self.norm_out(self.proj_out(_run_layers(self.layers, self.proj_in(x), latents)))


class FacePerceiverResampler(nn.Module):
    """``ip_adapter_faceid.py`` FacePerceiverResampler: the given latents (the FaceID tokens) attend to the CLIP
    hidden states; no learned queries."""

    def __init__(self, sd: dict[str, torch.Tensor], clip_dim: int, cross_dim: int, prefix: str):
        super().__init__()
        dim = sd[f"{prefix}proj_in.weight"].shape[0]
        self.proj_in = nn.Linear(clip_dim, dim)
        self.proj_out = nn.Linear(dim, cross_dim)
        self.norm_out = nn.LayerNorm(cross_dim)
        self.layers = _layers(sd, dim, prefix)

    def forward(self, latents, x):
        return self.norm_out(self.proj_out(_run_layers(self.layers, self.proj_in(x), latents)))


class ProjPlus(nn.Module):
    """FaceID Plus / Plus v2 (``ProjPlusModel``): (B, 512) face embedding + (B, T, clip_dim) CLIP hidden states of the
    aligned face crop -> (B, tokens, cross_dim). ``shortcut`` (v2): ``x + scale · resampler(x, h)``."""

    PREFIX = "perceiver_resampler."

    def __init__(self, sd: dict[str, torch.Tensor], v):
        super().__init__()
        self.tokens, self.cross_dim = v.tokens, v.cross_dim
        d = v.input_dim
        self.proj = nn.Sequential(nn.Linear(d, d * 2), nn.GELU(), nn.Linear(d * 2, v.tokens * v.cross_dim))
        self.norm = nn.LayerNorm(v.cross_dim)
        self.perceiver_resampler = FacePerceiverResampler(sd, v.clip_dim, v.cross_dim, self.PREFIX)

    def forward(self, face, clip_hidden, shortcut: bool = False, scale: float = 1.0):
        x = self.norm(self.proj(face).reshape(-1, self.tokens, self.cross_dim))
        out = self.perceiver_resampler(x, clip_hidden)
        return x + scale * out if shortcut else out
