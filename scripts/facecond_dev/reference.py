"""Reference maths written out for tests to compare the pack against (float64, no fused kernels)."""

from __future__ import annotations

import math

import torch


def hand_attention(q, k, v, heads: int) -> torch.Tensor:
    """softmax(Q Kᵀ / √d) V per head, written out in float64: (B, T, h*d)."""
    b, t, c = q.shape
    d = c // heads
    out = torch.empty(b, t, c, dtype=torch.float64)
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        w = torch.softmax(q[..., sl].double() @ k[..., sl].double().transpose(1, 2) / math.sqrt(d), dim=-1)
        out[..., sl] = w @ v[..., sl].double()
    return out


def diffusers_faceid_plus(proj: dict[str, torch.Tensor], depth: int, heads: int, ffn_ratio: int = 4):
    """diffusers' ``IPAdapterFaceIDPlusImageProjection`` holding the ``image_proj.*`` tensors (prefix stripped) of a
    FaceID Plus file: the reference our ``ProjPlus`` is compared with. The key renames are diffusers' own
    (``UNet2DConditionLoadersMixin._convert_ip_adapter_image_proj_to_diffusers``), written per layer so any depth
    loads (its converter assumes 4); ``load_state_dict(strict=True)`` proves every tensor found its place."""
    from diffusers.models.embeddings import IPAdapterFaceIDPlusImageProjection

    p = "perceiver_resampler."
    out = {}
    for k, v in proj.items():
        if not k.startswith(p):
            out[{"proj.0.weight": "proj.net.0.proj.weight", "proj.0.bias": "proj.net.0.proj.bias",
                 "proj.2.weight": "proj.net.2.weight", "proj.2.bias": "proj.net.2.bias"}.get(k, k)] = v
            continue
        name = k[len(p):]
        parts = name.split(".")
        if parts[0] != "layers":
            out[name] = v
            continue
        i, rest = parts[1], ".".join(parts[2:])
        base = f"layers.{i}."
        if rest.startswith("0.norm1."):
            out[base + "ln0." + parts[-1]] = v
        elif rest.startswith("0.norm2."):
            out[base + "ln1." + parts[-1]] = v
        elif rest == "0.to_q.weight":
            out[base + "attn.to_q.weight"] = v
        elif rest == "0.to_kv.weight":
            out[base + "attn.to_k.weight"], out[base + "attn.to_v.weight"] = v.chunk(2, dim=0)
        elif rest == "0.to_out.weight":
            out[base + "attn.to_out.0.weight"] = v
        elif rest.startswith("1.0."):
            out[base + "ff.0." + parts[-1]] = v
        elif rest == "1.1.weight":
            out[base + "ff.1.net.0.proj.weight"] = v
        elif rest == "1.3.weight":
            out[base + "ff.1.net.2.weight"] = v
    cross = proj["norm.weight"].shape[0]
    m = IPAdapterFaceIDPlusImageProjection(
        embed_dims=proj[p + "proj_in.weight"].shape[0], output_dims=proj[p + "proj_out.weight"].shape[0],
        hidden_dims=proj[p + "proj_in.weight"].shape[1], id_embeddings_dim=proj["proj.0.weight"].shape[1],
        depth=depth, heads=heads, num_tokens=proj["proj.2.weight"].shape[0] // cross, ffn_ratio=ffn_ratio)
    m.load_state_dict(out, strict=True)
    return m.eval()


def diffusers_faceid_plus_tokens(m, face, clip_hidden, shortcut: bool, scale: float) -> torch.Tensor:
    """The module's tokens for (B, 512) faces and (B, T, D) CLIP hidden states (one image per face)."""
    m.clip_embeds, m.shortcut, m.shortcut_scale = clip_hidden[:, None], shortcut, scale
    with torch.no_grad():
        return m(face)
