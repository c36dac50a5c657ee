"""Where an IP-Adapter mask lands: the latent window each batch chunk's query tokens come from, and the mask cut to
it and resized to a layer's grid. Plain torch; ComfyUI's conventions (transformer_options keys, area layout) cited.

ComfyUI runs an area conditioning (ConditioningSetArea, ...AreaPercentage, ConditioningSetMask with mask bounds) on
the latent cropped to its area (``comfy/samplers.py`` ``get_area_and_mult``), so a cross-attention's queries then
cover the area, not the image. The area itself is not handed to attention patches; the node registers a
``calc_cond_batch`` wrapper that reads it from the conds (``cond_areas``) and puts it in transformer_options under
``AREAS_KEY``, by cond uuid (``transformer_options["uuids"]`` names each chunk's cond).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

log = logging.getLogger("facecond")

# transformer_options key: {cond uuid: (y, x, H, W)}, the offset of each area conditioning in the full (H, W) latent,
# in latent cells. ComfyUI does not hand the area to attention patches (``_calc_cond_batch`` sets only
# "cond_or_uncond", "uuids" and "sigmas", 0.3.75 and 0.28), so the pack's ``calc_cond_batch`` wrapper adds it.
AREAS_KEY = "facecond_areas"


def chunk_windows(extra_options: dict, chunks: int) -> tuple:
    """Per batch chunk, the ``(y, x, h, w, H, W)`` latent window its tokens come from: an area conditioning's area
    (``AREAS_KEY``, by the chunk's uuid) or the whole latent. (h, w) is the latent the UNet was called on."""
    h, w = (int(n) for n in extra_options["original_shape"][-2:])
    areas = extra_options.get(AREAS_KEY) or {}
    uuids = extra_options.get("uuids") or [None] * chunks
    out = []
    for u in uuids:
        y, x, big_h, big_w = areas.get(u) or (0, 0, h, w)
        out.append((y, x, h, w, big_h, big_w))
    return tuple(out)


def cond_areas(conds: list, latent_hw: tuple[int, int]) -> dict:
    """{uuid: (y, x, H, W)} of the 2-D area conditionings in ComfyUI's sampling conds (lists of dicts, areas
    resolved to latent cells ``(h, w, y, x)`` by ``resolve_areas_and_cond_masks_multidim``)."""
    out = {}
    for group in conds:
        for c in group or ():
            a = c.get("area")
            if a is not None and len(a) == 4 and "uuid" in c and not isinstance(a[0], str):
                out[c["uuid"]] = (int(a[2]), int(a[3]), int(latent_hw[0]), int(latent_hw[1]))
    return out


def window_mask(mask: torch.Tensor, windows: tuple, hw: tuple[int, int], rows: int) -> torch.Tensor:
    """(n, mh, mw) mask in [0, 1] covering the full latent -> (chunks*rows, h*w, 1) on the layer's (h, w) grid, for
    per-chunk windows ``(y, x, h, w, H, W)`` (``chunk_windows``): the window is cut from the mask to the nearest mask
    pixel (exact for image-sized masks: 8 pixels per latent cell), then resized bilinearly."""
    n, mh, mw = mask.shape
    if n not in (1, rows):
        raise ValueError(f"ApplyIPAdapter: attn_mask holds {n} masks but the latent batch is {rows}: give one mask "
                         f"(used for every image) or {rows} (one per image), e.g. repeat or cut the mask batch to "
                         "the Empty Latent Image batch_size.")
    out = []
    for y, x, h, w, big_h, big_w in windows:
        check_mask_aspect(mask.shape, (big_h, big_w))
        r0, c0 = round(y * mh / big_h), round(x * mw / big_w)
        r1, c1 = max(r0 + 1, round((y + h) * mh / big_h)), max(c0 + 1, round((x + w) * mw / big_w))
        crop = mask[:, None, r0:r1, c0:c1].float()  # (n, 1, rows, cols)
        m = F.interpolate(crop, size=hw, mode="bilinear", align_corners=False).flatten(1)[..., None]
        out.append(m.expand(rows, -1, -1))
    return torch.cat(out)


# A mask whose aspect differs from the latent's is stretched onto it (fractional positions kept: a left-half mask
# stays the left half). That is what a square SolidMask/drawn mask on a 2:3 latent gives, so it is allowed; when the
# stretch moves the mask's far edge by more than this many latent cells, a warning names the sizes (once per size).
ASPECT_TOLERANCE_CELLS = 1.0
_WARNED_ASPECT: set = set()


def check_mask_aspect(mask_shape: tuple, latent_hw: tuple[int, int]) -> None:
    """Log (once per sizes) when a (n, mh, mw) mask is stretched onto an (H, W) latent of another aspect."""
    mh, mw = mask_shape[-2:]
    big_h, big_w = latent_hw
    off = max(abs(mw * big_h / mh - big_w), abs(mh * big_w / mw - big_h))  # latent cells the far edge moves
    key = (tuple(mask_shape[-2:]), tuple(latent_hw))
    if off > ASPECT_TOLERANCE_CELLS and key not in _WARNED_ASPECT:
        _WARNED_ASPECT.add(key)
        log.warning("[facecond] ApplyIPAdapter: attn_mask is %dx%d (w x h) but the latent is %dx%d (%dx%d px): its "
                    "aspect differs, so it is stretched onto the image (its far edge moves by %.1f latent cells). Use "
                    "a mask the size of the image if the regions must keep their shape.", mw, mh, big_w, big_h,
                    big_w * 8, big_h * 8, off)


def layer_grid(tokens: int, extra_options: dict) -> tuple[int, int]:
    """(h, w) of the latent grid a layer's ``tokens`` query tokens come from."""
    shape = extra_options.get("activations_shape")
    if shape is not None and len(shape) == 4 and shape[2] * shape[3] == tokens:
        return int(shape[2]), int(shape[3])
    h, w = extra_options["original_shape"][-2:]
    for f in (1, 2, 4, 8, 16, 32, 64):
        if math.ceil(h / f) * math.ceil(w / f) == tokens:
            return math.ceil(h / f), math.ceil(w / f)
    raise ValueError(f"IP-Adapter mask: cannot place {tokens} tokens on the {h}x{w} latent")


