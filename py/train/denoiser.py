"""The one denoiser call every trainer makes (Celeb Basis / face TI, Face0, the IP-Adapter aggregator).

Pure torch: the ComfyUI model comes in duck-typed (``comfy.model_base.BaseModel``: ``apply_model``, ``encode_adm``,
``adm_channels``). API (stable):

``adm_vector(base, pooled, width, height, crop_w=0, crop_h=0, target_width=None, target_height=None) -> y | None``
    The class-conditioning ("ADM") vector ``y`` exactly as ComfyUI builds it when it samples (``BaseModel.extra_conds``
    calls ``encode_adm``; ``comfy.samplers.encode_model_conds`` defaults width/height to the latent's size in
    pixels): SDXL concatenates the pooled CLIP-G output (B, 1280) with sinusoidal embeddings of the original size,
    the crop's top-left corner and the target size (Podell et al. 2023, "SDXL", sec. 2.2 micro-conditioning), 2816
    wide. ``None`` for models without class conditioning (SD1.x, SD2.x). One (width, height, crop) for the batch, or
    one per row as sequences of length B.

``needs_adm(base) -> bool``: whether the model's U-Net takes ``y`` (its ``adm_in_channels``).

``denoise(base, x, sigma, context, y=None, transformer_options=None) -> x0``
    ``base.apply_model(x, sigma, c_crossattn=context, y=y, transformer_options=...)``: the denoised latent for every
    parameterisation (EPS, V-prediction), ComfyUI's own call. ``y`` is required iff ``needs_adm(base)`` (ValueError
    naming the fix otherwise); a (1, D) ``y`` is expanded to the batch. Without ``y`` and transformer options the
    call is the one the trainers made before (SD1.x results bit-identical).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def needs_adm(base) -> bool:
    return bool(getattr(base, "adm_channels", 0))


def _per_row(value, b: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != b:
            raise ValueError(f"adm_vector: {name} has {len(value)} entries for a batch of {b}")
        return list(value)
    return [value] * b


def adm_vector(base, pooled: torch.Tensor, width: int | Sequence[int], height: int | Sequence[int],
               crop_w: int | Sequence[int] = 0, crop_h: int | Sequence[int] = 0,
               target_width: int | Sequence[int] | None = None,
               target_height: int | Sequence[int] | None = None) -> torch.Tensor | None:
    if not needs_adm(base):
        return None
    if pooled is None:
        raise ValueError("adm_vector: this model is class-conditional (SDXL): it needs the pooled text output "
                         "(CLIP-G's 'pooled_output' of the conditioning)")
    b = pooled.shape[0]
    w, h = _per_row(width, b, "width"), _per_row(height, b, "height")
    cw, ch = _per_row(crop_w, b, "crop_w"), _per_row(crop_h, b, "crop_h")
    tw = _per_row(target_width, b, "target_width") if target_width is not None else w
    th = _per_row(target_height, b, "target_height") if target_height is not None else h
    rows = [base.encode_adm(pooled_output=pooled[i:i + 1], width=int(w[i]), height=int(h[i]), crop_w=int(cw[i]),
                            crop_h=int(ch[i]), target_width=int(tw[i]), target_height=int(th[i]),
                            device=pooled.device)
            for i in range(b)]
    return torch.cat(rows)


def denoise(base, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None,
            transformer_options: dict | None = None) -> torch.Tensor:
    extra = {}
    if needs_adm(base):
        if y is None:
            raise ValueError("training on a class-conditional model (SDXL) needs its ADM vector y (pooled text "
                             "output + size and crop conditioning, py/train/denoiser.adm_vector); the trainer gave "
                             "none")
        if y.shape[0] != x.shape[0]:
            y = y.expand(x.shape[0], -1) if y.shape[0] == 1 else y
        extra["y"] = y.to(x.device)
    elif y is not None:
        raise ValueError("denoise: y given for a model without class conditioning (SD1.x / SD2.x)")
    if transformer_options is not None:
        extra["transformer_options"] = transformer_options
    return base.apply_model(x, sigma, c_crossattn=context, **extra)
