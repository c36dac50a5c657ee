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
