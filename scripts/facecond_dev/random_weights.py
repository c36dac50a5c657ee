"""Random weights in the real file layouts of the models the pack loads, for tests and benchmarks (seeded, so
the same call always gives the same tensors)."""

from __future__ import annotations

import math

import torch

# Inner widths of the cross-attentions, in IP-Adapter order (input blocks, output blocks, middle block)
SD15_LAYERS = [320, 320, 640, 640, 1280, 1280, *[1280] * 3, *[640] * 3, *[320] * 3, 1280]
SDXL_LAYERS = [*[640] * 4, *[1280] * 20, *[1280] * 30, *[640] * 6, *[1280] * 10]  # 70: in 4-8, out 0-5, middle


def _resampler(prefix: str, dim: int, input_dim: int, out_dim: int, depth: int, inner: int, ff: int) -> dict:
    shapes = {f"{prefix}proj_in.weight": (dim, input_dim), f"{prefix}proj_in.bias": (dim,),
              f"{prefix}proj_out.weight": (out_dim, dim), f"{prefix}proj_out.bias": (out_dim,),
              f"{prefix}norm_out.weight": (out_dim,), f"{prefix}norm_out.bias": (out_dim,)}
    for i in range(depth):
        p = f"{prefix}layers.{i}."
        shapes |= {p + "0.norm1.weight": (dim,), p + "0.norm1.bias": (dim,), p + "0.norm2.weight": (dim,),
                   p + "0.norm2.bias": (dim,), p + "0.to_q.weight": (inner, dim),
                   p + "0.to_kv.weight": (inner * 2, dim),
                   p + "0.to_out.weight": (dim, inner), p + "1.0.weight": (dim,), p + "1.0.bias": (dim,),
                   p + "1.1.weight": (dim * ff, dim), p + "1.3.weight": (dim, dim * ff)}
    return shapes


def random_state_dict(kind: str, input_dim: int, layer_dims: list[int], cross_dim: int = 768, tokens: int = 4,
                      seed: int = 0, scale: float = 0.05, lora_rank: int = 0, clip_dim: int = 1280,
                      depth: int = 1, inner: int | None = None, ff: int = 4, dim: int | None = None
                      ) -> dict[str, torch.Tensor]:
    """A random IP-Adapter in the real flat key layout (tests, benchmarks): ``layer_dims`` = inner width of each
    cross-attention (SD1.5: 320, 320, 640, 640, 1280, 1280, 1280 x3, 640 x3, 320 x3, 1280). ``lora_rank`` > 0 adds
    a FaceID LoRA (``ip_adapter.<n>.to_q_lora.down.weight``...) on both attentions of each transformer block:
    processor 2n (self-attention, in = out = inner) and 2n+1 (cross-attention, k and v take ``cross_dim``).
    Kinds: plain, plus (a ``depth``-layer Resampler, 2 heads unless ``inner``), full (full-face), faceid (also
    FaceID Portrait: tokens=16, no LoRA), faceid_plus (ProjPlusModel: FaceID MLP + a ``depth``-layer
    FacePerceiverResampler over ``clip_dim``-wide CLIP hidden states, heads = cross_dim // 64 as the authors')."""
    g = torch.Generator().manual_seed(seed)
    if kind == "plus":  # a Resampler with learned queries
        dim = dim or cross_dim  # the Resampler's width (1280 in the SDXL plus files)
        shapes = {"latents": (1, tokens, dim), **_resampler("", dim, input_dim, cross_dim, depth, inner or 128, ff)}
    elif kind == "full":
        shapes = {"proj.0.weight": (input_dim, input_dim), "proj.0.bias": (input_dim,),
                  "proj.2.weight": (cross_dim, input_dim), "proj.2.bias": (cross_dim,),
                  "proj.3.weight": (cross_dim,), "proj.3.bias": (cross_dim,)}
    elif kind in ("faceid", "faceid_plus"):
        shapes = {"proj.0.weight": (input_dim * 2, input_dim), "proj.0.bias": (input_dim * 2,),
                  "proj.2.weight": (cross_dim * tokens, input_dim * 2), "proj.2.bias": (cross_dim * tokens,)}
        if kind == "faceid_plus":
            shapes |= _resampler("perceiver_resampler.", cross_dim, clip_dim, cross_dim, depth,
                                 inner or cross_dim // 64 * 64, ff)
    else:
        shapes = {"proj.weight": (cross_dim * tokens, input_dim), "proj.bias": (cross_dim * tokens,)}
    if kind not in ("plus", "full"):
        shapes |= {"norm.weight": (cross_dim,), "norm.bias": (cross_dim,)}
    sd = {f"image_proj.{k}": torch.randn(s, generator=g) * scale + (1.0 if _is_norm(k) and k.endswith("weight") else 0)
          for k, s in shapes.items()}
    for n, d in enumerate(layer_dims):
        for w in ("to_k_ip", "to_v_ip"):
            sd[f"ip_adapter.{2 * n + 1}.{w}.weight"] = torch.randn((d, cross_dim), generator=g) / math.sqrt(cross_dim)
    for n, d in enumerate(layer_dims if lora_rank else []):
        for p in (2 * n, 2 * n + 1):
            for proj in ("to_q", "to_k", "to_v", "to_out"):
                d_in = cross_dim if p % 2 and proj in ("to_k", "to_v") else d
                key = f"ip_adapter.{p}.{proj}_lora"
                sd[f"{key}.down.weight"] = torch.randn((lora_rank, d_in), generator=g) / math.sqrt(d_in)
                sd[f"{key}.up.weight"] = torch.randn((d, lora_rank), generator=g) / math.sqrt(lora_rank)
    return sd


def _is_norm(key: str) -> bool:
    """LayerNorm weights (start near 1): norm*, the feed-forward's first module, full-face's proj.3."""
    return "norm" in key or key.endswith((".1.0.weight", "proj.3.weight"))
