"""Preview drawing and face masks for FaceDetectCrop (numpy/OpenCV, images float32 (H, W, 3) in [0, 1])."""

from __future__ import annotations

import cv2
import numpy as np

# landmark colours: left eye, right eye, nose, left mouth, right mouth (RGB)
_LM_COLOURS = [(255, 50, 50), (50, 100, 255), (255, 255, 50), (255, 50, 255), (50, 255, 255)]


def draw_faces(image: np.ndarray, faces: list, *, missing: bool = False) -> np.ndarray:
    """A copy of the image with each face's box (green; grey for a passthrough), landmarks and number.

    faces: objects with ``box`` (4,), ``landmarks`` (5, 2) and ``score``. missing: frame the image in red.
    """
    # OpenCV 5 draws text on 8-bit images only; convertScaleAbs scales, rounds and saturates in one pass
    img = cv2.convertScaleAbs(np.ascontiguousarray(image[..., :3]), alpha=255.0)
    h, w = img.shape[:2]
    t = max(1, round(max(h, w) / 400))
    for n, f in enumerate(faces):
        x1, y1, x2, y2 = (round(float(v)) for v in f.box)
        colour = (50, 255, 50) if f.score > 0 else (150, 150, 150)
        cv2.rectangle(img, (x1, y1), (x2, y2), colour, t, cv2.LINE_AA)
        for (x, y), c in zip(f.landmarks, _LM_COLOURS):
            cv2.circle(img, (round(float(x)), round(float(y))), 2 * t, c, -1, cv2.LINE_AA)
        label = f"{n}: {f.score:.2f}"
        cv2.putText(img, label, (x1, max(0, y1 - 3 * t)), cv2.FONT_HERSHEY_SIMPLEX, 0.4 * t, colour, t, cv2.LINE_AA)
    if missing:
        cv2.rectangle(img, (0, 0), (w - 1, h - 1), (255, 25, 25), 2 * t)
    return np.multiply(img, np.float32(1 / 255), dtype=np.float32)


def face_mask(h: int, w: int, faces: list) -> np.ndarray:
    """(H, W) float32 mask, 1 inside every face's detector box (0 for passthrough entries)."""
    mask = np.zeros((h, w), np.float32)
    for f in faces:
        if f.score <= 0:
            continue
        x1, y1, x2, y2 = f.box
        xa, ya = max(0, int(np.floor(x1))), max(0, int(np.floor(y1)))
        xb, yb = min(w, int(np.ceil(x2))), min(h, int(np.ceil(y2)))
        if xb > xa and yb > ya:
            mask[ya:yb, xa:xb] = 1.0
    return mask
