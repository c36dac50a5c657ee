"""Face geometry: 5-point similarity alignment, Face0's margin crop, rotations and paste-back.

Every crop is described by a 2x3 affine ``M`` mapping source-image pixel coordinates to crop
coordinates (``crop = warpAffine(image, M, (size, size))``), so one function pastes any crop back.
Images here are numpy float32 (H, W, C) in [0, 1]; points are (x, y) in pixels.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

# ArcFace / insightface 112x112 five-point template: left eye, right eye, nose tip, left and right mouth
# corners (image-left first). Values from insightface python-package `insightface/utils/face_align.py`
# (`arcface_dst`), the convention every insightface recogniser (buffalo_l, antelopev2) is trained on.
ARCFACE_DST = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)
ARCFACE_SIZE = 112
FACENET_SIZE = 160

# Face0 (Valevski et al. 2023, §3): the MTCNN box is enlarged by 10 px left/right, 33 px top, 15 px bottom,
# then resized to 160x160. We read those pixels as pixels of the 160-px output, the facenet-pytorch
# convention for `margin` (`extract_face`: margin * box_side / (image_size - margin)), so they scale with
# the face: left/right = 10 * w / 140, top = 33 * h / 112, bottom = 15 * h / 112 (w, h: detector box).
FACE0_MARGINS = {"left": 10.0, "right": 10.0, "top": 33.0, "bottom": 15.0}


def umeyama(src: np.ndarray, dst: np.ndarray, dtype=np.float32) -> np.ndarray:
    """Least-squares similarity transform (rotation, uniform scale, translation) taking src to dst.

    Umeyama, "Least-squares estimation of transformation parameters between two point patterns",
    IEEE TPAMI 13(4), 1991, eqs. 34-43 (what skimage's SimilarityTransform.estimate implements).
    src, dst: (N, 2). Returns the (2, 3) matrix M with dst ~= M @ [x, y, 1].
    """
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    n = src.shape[0]
    mu_s, mu_d = src.mean(0), dst.mean(0)
    sc, dc = src - mu_s, dst - mu_d
    cov = dc.T @ sc / n  # (2, 2), eq. 38
    d = np.ones(2)
    if np.linalg.det(cov) < 0:  # eq. 39: no reflections
        d[-1] = -1.0
    u, s, vt = np.linalg.svd(cov)
    r = u @ np.diag(d) @ vt  # eq. 40
    var_s = sc.var(0).sum()
    if var_s <= 1e-12:
        raise ValueError("umeyama: source points are all at one place")
    scale = (s * d).sum() / var_s  # eq. 42
    t = mu_d - scale * r @ mu_s  # eq. 41
    return np.concatenate([scale * r, t[:, None]], axis=1).astype(dtype)


def norm_crop_matrix(landmarks: np.ndarray, size: int = ARCFACE_SIZE) -> np.ndarray:
    """insightface's ``estimate_norm`` bit for bit: (2, 3) float64. insightface hands skimage's
    ``SimilarityTransform.estimate`` float32 landmarks and a float32 template, so the means, the covariance and
    the SVD run in float32 (skimage 0.26 ``_umeyama``, repeated here step for step, same order); ``umeyama``
    above works in float64 and lands up to 4e-5 away, enough to move a few pixels of the crop by one grey level.
    """
    src = np.asarray(landmarks, np.float32)
    dst = ARCFACE_DST * np.float32(size / ARCFACE_SIZE)
    n, dim = src.shape
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_demean, dst_demean = src - src_mean, dst - dst_mean
    a = dst_demean.T @ src_demean / n
    d = np.ones((dim,), dtype=np.float64)
    if np.linalg.det(a) < 0:
        d[dim - 1] = -1
    t = np.eye(dim + 1, dtype=np.float64)
    u, s, v = np.linalg.svd(a)
    if np.count_nonzero(s > s.max() * max(a.shape) * np.finfo(float).eps) < dim:
        raise ValueError("norm_crop_matrix: the landmarks are degenerate (all on one line)")
    t[:dim, :dim] = u @ np.diag(d) @ v
    scale = 1.0 / src_demean.var(axis=0).sum() * (s @ d)
    t[:dim, dim] = dst_mean - scale * (t[:dim, :dim] @ src_mean.T)
    t[:dim, :dim] *= scale
    return t[:2].copy()


def arcface_affine(landmarks: np.ndarray, size: int = ARCFACE_SIZE, dtype=np.float32) -> np.ndarray:
    """(2, 3) image->crop matrix aligning 5 landmarks to the ArcFace template at ``size`` (112 multiple).
    dtype=np.float64 keeps the full precision of insightface's ``estimate_norm`` (skimage, float64)."""
    return umeyama(landmarks, ARCFACE_DST * (size / ARCFACE_SIZE), dtype)


def eye_angle(landmarks: np.ndarray) -> float:
    """Roll of a face in radians: the angle of the line from the left to the right eye (0 = level)."""
    (lx, ly), (rx, ry) = landmarks[0], landmarks[1]
    return math.atan2(ry - ly, rx - lx)


def face0_affine(box_wh: tuple[float, float], center: tuple[float, float], angle: float = 0.0,
                 margin_scale: float = 1.0, size: int = FACENET_SIZE) -> np.ndarray:
    """(2, 3) image->crop matrix of Face0's margin crop, square, aspect ratio kept.

    box_wh: detector box width/height measured in the face's upright frame; center: box centre in
    the image; angle: face roll (radians; 0 for a normal upright photo). The box is widened by the
    Face0 margins (scaled as FACE0_MARGINS says, times margin_scale), then grown to a square around
    its centre (more context, no stretching), then rotated upright and resized to ``size``.
    """
    w, h = float(box_wh[0]), float(box_wh[1])
    m = {k: v * margin_scale for k, v in FACE0_MARGINS.items()}
    left = m["left"] * w / (size - m["left"] - m["right"])
    right = m["right"] * w / (size - m["left"] - m["right"])
    top = m["top"] * h / (size - m["top"] - m["bottom"])
    bottom = m["bottom"] * h / (size - m["top"] - m["bottom"])
    side = max(w + left + right, h + top + bottom)
    # crop centre in the upright frame, relative to the box centre (+y is down)
    off = np.array([(right - left) / 2.0, (bottom - top) / 2.0])
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s], [s, c]])  # upright frame -> image frame
    center_img = np.asarray(center, np.float64) + rot @ off
    k = size / side
    lin = k * rot.T  # image -> upright, scaled
    t = np.array([size / 2.0, size / 2.0]) - lin @ center_img
    return np.concatenate([lin, t[:, None]], axis=1).astype(np.float32)


def warp_crop(image: np.ndarray, m: np.ndarray, size: int) -> np.ndarray:
    """Crop ``size`` x ``size`` pixels through M; area-averages first when shrinking (no aliasing).

    Outside the image is black (insightface's norm_crop uses borderValue 0 too).
    """
    m = np.asarray(m, np.float64)
    scale = math.sqrt(abs(np.linalg.det(m[:, :2])))
    if scale < 0.5:
        # Only the source region that lands in the crop, shrunk with INTER_AREA to ~the crop's scale.
        inv = cv2.invertAffineTransform(m)
        corners = np.array([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]], np.float64) @ inv.T
        x0, y0 = np.floor(corners.min(0)).astype(int) - 2
        x1, y1 = np.ceil(corners.max(0)).astype(int) + 2
        h, w = image.shape[:2]
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
        if x1 - x0 >= 2 and y1 - y0 >= 2:
            roi = image[y0:y1, x0:x1]
            f = min(1.0, scale * 1.5)
            nw, nh = max(1, round((x1 - x0) * f)), max(1, round((y1 - y0) * f))
            small = cv2.resize(roi, (nw, nh), interpolation=cv2.INTER_AREA)
            fx, fy = (x1 - x0) / nw, (y1 - y0) / nh
            # small pixel (u, v) <-> source ((u + 0.5) * fx - 0.5 + x0, ...): compose into M
            to_src = np.array([[fx, 0, 0.5 * fx - 0.5 + x0], [0, fy, 0.5 * fy - 0.5 + y0], [0, 0, 1]])
            m = m @ to_src
            image = small
    out = cv2.warpAffine(np.ascontiguousarray(image, np.float32), m.astype(np.float64), (size, size),
                         flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return out.reshape(size, size, -1)


def norm_crop(image_u8: np.ndarray, m: np.ndarray, size: int) -> np.ndarray:
    """insightface's ``face_align.norm_crop``: one plain ``cv2.warpAffine`` (INTER_LINEAR, black border) of
    the uint8 image, no pre-shrinking; returns the uint8 crop (size, size, C)."""
    out = cv2.warpAffine(np.ascontiguousarray(image_u8), np.asarray(m, np.float64), (size, size), borderValue=0.0)
    return out.reshape(size, size, -1)


def transform_points(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Apply a (2, 3) affine to (..., 2) points."""
    pts = np.asarray(pts, np.float64)
    return (pts @ m[:, :2].T + m[:, 2]).astype(np.float32)


def square_mask(size: int, feather: float) -> np.ndarray:
    """(size, size) alpha of a whole crop with a soft edge; feather: edge width as a fraction of the side
    (0: hard edge). Values under 1e-3 are exactly 0, so pixels outside the soft edge stay untouched."""
    mask = np.ones((size, size), np.float32)
    k = round(feather * size)
    if k > 0:
        mask = np.zeros((size, size), np.float32)
        mask[k:-k, k:-k] = 1.0
        mask = cv2.GaussianBlur(mask, (0, 0), sigmaX=k / 2.0)
        mask[mask < 1e-3] = 0.0
    return mask


def paste_back(image: np.ndarray, crop: np.ndarray, m: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Blend an (edited) crop back into its source image through the inverse of M (the crop's ``warp_crop``
    matrix) with a crop-space alpha ``mask`` (e.g. ``square_mask``); returns (image, alpha in image space).

    Pixels where the warped mask is 0 are returned bit-identical (not merely close): the blend is only
    evaluated where alpha > 0. Does not modify ``image``.
    """
    h, w = image.shape[:2]
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    m64 = np.asarray(m, np.float64)
    back = cv2.warpAffine(np.ascontiguousarray(crop, np.float32), m64, (w, h), flags=flags).reshape(h, w, -1)
    alpha = cv2.warpAffine(np.ascontiguousarray(mask, np.float32), m64, (w, h), flags=flags,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    alpha = np.clip(alpha, 0.0, 1.0)
    out = image.copy()
    sel = alpha > 0
    a = alpha[sel][:, None]
    out[sel] = image[sel] * (1.0 - a) + back[sel] * a
    return out, alpha


def rot90_points(pts: np.ndarray, k: int, h: int, w: int) -> np.ndarray:
    """Map points found in ``np.rot90(image, k)`` (image h x w, CCW quarter turns) back to the image.

    Continuous pixel-edge coordinates (a box edge at x = W maps exactly).
    """
    p = np.asarray(pts, np.float32).copy()
    x, y = p[..., 0].copy(), p[..., 1].copy()
    k %= 4
    if k == 1:  # rotated[i, j] = image[j, W-1-i]
        p[..., 0], p[..., 1] = w - y, x
    elif k == 2:
        p[..., 0], p[..., 1] = w - x, h - y
    elif k == 3:  # rotated[i, j] = image[H-1-j, i]
        p[..., 0], p[..., 1] = y, h - x
    return p


def box_of_points(pts: np.ndarray) -> np.ndarray:
    """Axis-aligned (x1, y1, x2, y2) box around (..., N, 2) points."""
    return np.concatenate([pts.min(-2), pts.max(-2)], axis=-1)
