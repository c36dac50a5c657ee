"""Skin retouching for FaceChain's input processing (Liu et al. 2023: the prepared photos are skin-retouched
before tagging and training; FaceChain runs ModelScope's learned ``damo/cv_unet_skin-retouching``).

Here a classical stand-in: an edge-preserving smoothing (cv2 bilateral filter: blurs skin texture and
blemishes, keeps the edges of eyes, brows, lips and hair) blended in only inside a skin mask:

    out = image + strength * mask * (bilateral(image) - image)

mask = skin colour (YCrCb box Cr 133..173, Cb 77..127; Chai & Ngan, "Face segmentation using skin-color
map", 1999) inside the face region, feathered with a Gaussian, then cut to the region (exactly 0 outside it).
strength 0 returns the image unchanged (bit for bit); pixels where the mask is 0 are never changed.
"""

from __future__ import annotations

import cv2
import numpy as np

CR_RANGE = (133.0, 173.0)  # Chai & Ngan 1999, in 8-bit YCrCb units
CB_RANGE = (77.0, 127.0)
SIGMA_COLOR = 0.12  # bilateral range sigma in 0..1 intensity: skin texture is below it, facial edges above
SPACE_FRACTION = 1.0 / 128.0  # bilateral spatial sigma as a fraction of the crop side (4 px at 512)
FEATHER_FRACTION = 1.0 / 128.0  # mask feather sigma, same unit


def skin_colour(image: np.ndarray) -> np.ndarray:
    """(H, W) float32 1 where an RGB image in 0..1 has skin colour (YCrCb box), else 0."""
    rgb = np.asarray(image, np.float32) * 255.0
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b  # ITU-R BT.601, as cv2.COLOR_RGB2YCrCb
    cr = (r - y) * 0.713 + 128.0
    cb = (b - y) * 0.564 + 128.0
    ok = (cr >= CR_RANGE[0]) & (cr <= CR_RANGE[1]) & (cb >= CB_RANGE[0]) & (cb <= CB_RANGE[1])
    return ok.astype(np.float32)


def skin_mask(image: np.ndarray, region: np.ndarray) -> np.ndarray:
    """(H, W) float32 in 0..1: skin colour inside ``region`` (a soft face mask, 0 outside), feathered."""
    region = np.asarray(region, np.float32)
    hard = skin_colour(image) * (region > 0)
    sigma = max(0.5, FEATHER_FRACTION * max(image.shape[:2]))
    soft = cv2.GaussianBlur(hard, (0, 0), sigmaX=sigma, sigmaY=sigma)
    return np.clip(soft * region, 0.0, 1.0)


def smooth(image: np.ndarray) -> np.ndarray:
    """Edge-preserving smoothing of an RGB image in 0..1 (bilateral filter, sigmas scaled to its size)."""
    sigma_space = max(1.5, SPACE_FRACTION * max(image.shape[:2]))
    return cv2.bilateralFilter(np.ascontiguousarray(image, np.float32), -1, SIGMA_COLOR, sigma_space)


def retouch(image: np.ndarray, region: np.ndarray, strength: float) -> tuple[np.ndarray, np.ndarray]:
    """(retouched image, mask used). ``image`` (H, W, 3) float in 0..1 is not modified."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"retouch: strength must be in 0..1, got {strength}")
    image = np.asarray(image, np.float32)
    if strength == 0.0:
        return image.copy(), np.zeros(image.shape[:2], np.float32)
    mask = skin_mask(image, region)
    out = image + (strength * mask)[..., None] * (smooth(image) - image)
    return np.where(mask[..., None] > 0, out, image), mask
