"""Random weights in the real file layouts of the models the pack loads, for tests and benchmarks (seeded, so
the same call always gives the same tensors)."""

from __future__ import annotations

import math

import torch


def random_state_dict(kind: str, input_dim: int, layer_dims: list[int], cross_dim: int = 768, tokens: int = 4,
                      seed: int = 0, scale: float = 0.05, lora_rank: int = 0) -> dict[str, torch.Tensor]:
    """A random IP-Adapter in the real flat key layout (tests, benchmarks): ``layer_dims`` = inner width of each
    cross-attention (SD1.5: 320, 320, 640, 640, 1280, 1280, 1280 x3, 640 x3, 320 x3, 1280). ``lora_rank`` > 0 adds
    a FaceID LoRA (``ip_adapter.<n>.to_q_lora.down.weight``...) on both attentions of each transformer block:
    processor 2n (self-attention, in = out = inner) and 2n+1 (cross-attention, k and v take ``cross_dim``)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "plus":  # a 1-layer, 2-head Resampler
        dim = cross_dim
        shapes = {"latents": (1, tokens, dim), "proj_in.weight": (dim, input_dim), "proj_in.bias": (dim,),
                  "proj_out.weight": (cross_dim, dim), "proj_out.bias": (cross_dim,), "norm_out.weight": (cross_dim,),
                  "norm_out.bias": (cross_dim,), "layers.0.0.norm1.weight": (dim,), "layers.0.0.norm1.bias": (dim,),
                  "layers.0.0.norm2.weight": (dim,), "layers.0.0.norm2.bias": (dim,),
                  "layers.0.0.to_q.weight": (128, dim), "layers.0.0.to_kv.weight": (256, dim),
                  "layers.0.0.to_out.weight": (dim, 128), "layers.0.1.0.weight": (dim,),
                  "layers.0.1.0.bias": (dim,), "layers.0.1.1.weight": (dim * 4, dim),
                  "layers.0.1.3.weight": (dim, dim * 4)}
    elif kind == "faceid":
        shapes = {"proj.0.weight": (input_dim * 2, input_dim), "proj.0.bias": (input_dim * 2,),
                  "proj.2.weight": (cross_dim * tokens, input_dim * 2), "proj.2.bias": (cross_dim * tokens,)}
    else:
        shapes = {"proj.weight": (cross_dim * tokens, input_dim), "proj.bias": (cross_dim * tokens,)}
    if kind != "plus":
        shapes |= {"norm.weight": (cross_dim,), "norm.bias": (cross_dim,)}
    sd = {f"image_proj.{k}": torch.randn(s, generator=g) * scale + (1.0 if "norm" in k and k.endswith("weight") else 0)
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
