"""Fine-tuning an IP-Adapter together with the multi-reference aggregator, as Kazistova, Stepanov, Filatov
("Создание персонализированных генераций изображений", section 3.5) train it: "обучаемыми являются слои
Self-Attention, Linear, Layer Norm и Cross-Attention" (trainable: the self-attention, the IP-Adapter's image
projection — Linear + LayerNorm — and its image cross-attention W'_k, W'_v; IP-Adapter, Ye et al. 2023, keeps the
rest of the U-Net frozen). Pure torch.

``trainable_copy(adapter)``: a copy of a loaded (frozen, possibly cached and shared) ``IPAdapter`` whose projection
and per-layer W'_k, W'_v are fresh leaf tensors with ``requires_grad``; the original is never touched.
``trainable_params``: their names in the IP-Adapter file layout (``image_proj.*``, ``ip_adapter.{2n+1}.to_k_ip.weight``
/ ``to_v_ip.weight``), so a trainer state and the saved file use the same names.
``adapter_file_tensors(adapter, source)``: a complete IP-Adapter state dict, the loader's flat layout: the (trained)
projection and W'_k, W'_v, plus every other tensor of the source file unchanged (e.g. a FaceID file's LoRA; not an
aggregator it may hold: the caller adds the new one).
"""

from __future__ import annotations

import copy
import dataclasses

import torch

from .adapter import KV_ATTR, IPAdapter
from .aggregate import FILE_PREFIX


def kv_names(n: int) -> tuple[str, str]:
    """File names of the n-th cross-attention's W'_k, W'_v (diffusers numbering 1, 3, 5, ...)."""
    return f"ip_adapter.{2 * n + 1}.to_k_ip.weight", f"ip_adapter.{2 * n + 1}.to_v_ip.weight"


def trainable_copy(adapter: IPAdapter) -> IPAdapter:
    proj = copy.deepcopy(adapter.proj)
    if hasattr(proj, KV_ATTR):  # the model cache's copy of W'_k, W'_v: trained below as kv, not as projection
        delattr(proj, KV_ATTR)
    proj = proj.float().train().requires_grad_(True)
    kv = tuple((k.detach().clone().float().requires_grad_(True), v.detach().clone().float().requires_grad_(True))
               for k, v in adapter.kv)
    return dataclasses.replace(adapter, proj=proj, kv=kv)


def trainable_params(adapter: IPAdapter) -> dict[str, torch.Tensor]:
    out = {f"image_proj.{k}": p for k, p in adapter.proj.named_parameters() if not k.startswith(KV_ATTR + ".")}
    for n, (k, v) in enumerate(adapter.kv):
        nk, nv = kv_names(n)
        out[nk], out[nv] = k, v
    return out


def adapter_file_tensors(adapter: IPAdapter, source: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Flat ``image_proj.*`` / ``ip_adapter.*`` tensors of ``adapter`` (CPU, float32, contiguous); the other
    tensors of ``source`` (the file it was loaded from) are carried over unchanged."""
    ours = {f"image_proj.{k}": t for k, t in adapter.proj.state_dict().items() if not k.startswith(KV_ATTR + ".")}
    for n, (k, v) in enumerate(adapter.kv):
        nk, nv = kv_names(n)
        ours[nk], ours[nv] = k, v
    ours = {k: t.detach().float().cpu().contiguous() for k, t in ours.items()}
    kept = {k: t.clone().contiguous() for k, t in (source or {}).items()
            if k not in ours and not k.startswith(("image_proj.", FILE_PREFIX))}
    return kept | ours
