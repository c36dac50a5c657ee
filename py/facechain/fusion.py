"""Face-region geometry for FaceChain's preprocessing and face fusion (Liu et al., arXiv 2308.14256, §3.2-3.3).

Both steps cut a square, upright region around a face at a working resolution and (for fusion) paste an
edited version back (``align.paste_back`` with the masks below). The region is built on the face's 5-point
ArcFace alignment (``align.arcface_affine``, the Faces socket's ``affine_arcface``): that similarity transform
already turns a tilted or sideways face upright (FaceDetectCrop's upright correction finds those) and fixes the
face's scale, so

    M = Z o A,   Z: 112-px ArcFace crop -> working crop, zoomed out by ``context`` around the crop centre

``context`` = 1 gives exactly the 112x112 aligned face region; 2 shows about head and shoulders.
The head mask is a soft ellipse in ArcFace-crop coordinates (no segmentation model: FaceChain uses
Mask2Former human parsing; an ellipse covers face, forehead and chin, not the hair outline or the neck).
Images are numpy float32 (H, W, C) in [0, 1].
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from ..faces.align import ARCFACE_SIZE, warp_crop

# Head ellipse in ArcFace 112-px crop coordinates: centre and semi-axes (x, y). The template's eyes lie at
# y = 51.6 and its mouth corners at y = 92.3; the ellipse reaches from above the brows (y = -10) to
# below the chin (y = 114) and over both cheeks.
HEAD_CENTER = (56.0, 52.0)
HEAD_AXES = (50.0, 62.0)


def region_affine(affine_arcface: np.ndarray, context: float, size: int) -> np.ndarray:
    """(2, 3) image -> working-crop matrix: the ArcFace crop zoomed out by ``context``, at ``size`` px."""
    if context <= 0:
        raise ValueError(f"region_affine: context must be > 0, got {context}")
    k = size / (ARCFACE_SIZE * context)
    c = ARCFACE_SIZE / 2.0
    z = np.array([[k, 0.0, size / 2.0 - k * c], [0.0, k, size / 2.0 - k * c], [0.0, 0.0, 1.0]])
    a = np.vstack([np.asarray(affine_arcface, np.float64), [0.0, 0.0, 1.0]])
    return (z @ a)[:2].astype(np.float32)


def ellipse_mask(context: float, size: int, feather: float, scale: float = 1.0) -> np.ndarray:
    """(size, size) float32 soft head ellipse in a working crop made by ``region_affine(., context, size)``.

    feather: Gaussian blur sigma as a fraction of the ellipse's short semi-axis (0: hard edge); the
    ellipse is shrunk by that much first, so the blurred edge stays inside the hard one. scale grows it.
    Exactly zero beyond (hard ellipse + 3 sigma), so pixels outside stay untouched when pasting.
    """
    k = size / (ARCFACE_SIZE * context)
    cx = size / 2.0 + k * (HEAD_CENTER[0] - ARCFACE_SIZE / 2.0)
    cy = size / 2.0 + k * (HEAD_CENTER[1] - ARCFACE_SIZE / 2.0)
    ax, ay = k * HEAD_AXES[0] * scale, k * HEAD_AXES[1] * scale
    sigma = feather * min(ax, ay)
    yy, xx = np.mgrid[:size, :size].astype(np.float32) + 0.5
    inner = 1.0 - 1.5 * sigma / max(min(ax, ay), 1e-6)  # pull the edge in by 1.5 sigma
    r = ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2
    mask = (r <= max(inner, 0.05) ** 2).astype(np.float32)
    if sigma > 0.3:
        mask = cv2.GaussianBlur(mask, (0, 0), sigmaX=sigma, borderType=cv2.BORDER_CONSTANT)
        mask[mask < 1e-3] = 0.0  # a true zero outside: no drift in untouched pixels
        mask = np.clip(mask / max(float(mask.max()), 1e-6), 0.0, 1.0)
        mask[mask > 0.999] = 1.0  # and a true one in the middle
    return mask


def cut(image: np.ndarray, m: np.ndarray, size: int) -> np.ndarray:
    """The working crop through M (outside the image: black, as every crop of the pack)."""
    return warp_crop(image, m, size)


def roll_degrees(affine_arcface: np.ndarray) -> float:
    """How far the aligned crop turned the face (degrees, counter-clockwise in the image)."""
    m = np.asarray(affine_arcface, np.float64)
    return math.degrees(math.atan2(m[1, 0], m[0, 0]))


# ---- the template face in pixels ----
# FaceChain fuses each generated face "with the template face" (§3.3) through ModelScope's face-fusion model. Here
# the template enters in two places: the identity conditioning of the re-diffusion (the user's MODEL/CONDITIONING)
# and in pixels, as the re-diffusion's init: the template's face, warped onto the generated face's landmarks, is
# blended into the crop inside the head mask before it is re-noised (SDEdit: Meng et al., "SDEdit: Guided Image
# Synthesis and Editing with Stochastic Differential Equations", ICLR 2022, §3: a guide image, noised to t0 and
# denoised, keeps the guide's layout and takes the model's realism). Both faces are in the same ArcFace frame, so
# "warping onto the landmarks" is the template's own region crop at the same context and size.


def template_region(template_image: np.ndarray, affine_arcface: np.ndarray, context: float,
                    size: int) -> tuple[np.ndarray, np.ndarray]:
    """The template face cut exactly as a generated face's working crop: (size, size, 3) pixels and (size, size)
    validity (1 where the crop lies inside the template photo)."""
    m = region_affine(affine_arcface, context, size)
    ones = np.ones((*template_image.shape[:2], 1), np.float32)
    return cut(template_image, m, size), warp_crop(ones, m, size)[..., 0]


def template_from_aligned(crop112: np.ndarray, context: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The same from a 112-px ArcFace-aligned crop alone (FACES' crops_arcface): zoomed into the working crop,
    valid only over the 112 region (black beyond it)."""
    z = region_affine(np.eye(2, 3, dtype=np.float32), context, size)
    ones = np.ones((ARCFACE_SIZE, ARCFACE_SIZE, 1), np.float32)
    return warp_crop(crop112, z, size), warp_crop(ones, z, size)[..., 0]


def match_colour(source: np.ndarray, target: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """``source`` with each RGB channel's weighted mean and std moved to ``target``'s over ``weight`` > 0
    (Reinhard et al., "Color Transfer between Images", IEEE CG&A 21(5), 2001, eq. 10, here per RGB channel rather
    than in l-alpha-beta): the template's face takes the generated image's light and skin tone."""
    w = np.asarray(weight, np.float64)[..., None]
    tot = float(w.sum())
    if tot <= 1e-6:
        return source.copy()
    mu_s, mu_t = (source * w).sum((0, 1)) / tot, (target * w).sum((0, 1)) / tot
    sd_s = np.sqrt((((source - mu_s) ** 2) * w).sum((0, 1)) / tot)
    sd_t = np.sqrt((((target - mu_t) ** 2) * w).sum((0, 1)) / tot)
    out = (source - mu_s) * (sd_t / np.maximum(sd_s, 1e-6)) + mu_t
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def blend_template(crop: np.ndarray, template: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """crop * (1 - w) + template * w per pixel; w (size, size) in [0, 1] (strength x head mask x validity)."""
    w = np.clip(np.asarray(weight, np.float32), 0.0, 1.0)[..., None]
    return (crop * (1.0 - w) + template * w).astype(np.float32)
