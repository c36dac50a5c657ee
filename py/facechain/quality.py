"""Face-quality score for FaceChain's template-face choice (Liu et al., FaceChain, arXiv 2308.14256, §3.3).

FaceChain post-processes every generation against a *template face*: the user photo with the best Face
Quality Assessment score (a learned FQA network from modelscope). We have no FQA weights here, so the
score is an explicit, documented formula over what a detector already gives (confidence, box, 5
landmarks) plus the sharpness of the aligned crop. Every term lies in [0, 1], higher is better:

    confidence  c = detector score (0 for a ``passthrough`` stand-in: no face, quality 0)
    size        s = clip((ln side - ln 32) / (ln 256 - ln 32), 0, 1)        side: longer box side in pixels
    visibility  v = area of the face box (grown by 20%) inside the image / its area   (faces cut by the frame)
    frontality  f = clip(1 - 0.6*yaw - 0.2*roll - 0.2*pitch, 0, 1) with, in the face's upright frame,
                    yaw   = |nose_x - mid_eyes_x| / (eye_distance / 2)           (0 frontal, 1 nose at an eye)
                    roll  = |eye-line angle| / 45 deg                            (upright correction fixes most)
                    pitch = |(nose_y - eye_y) / (mouth_y - eye_y) - 0.494| / 0.5 (0.494: ArcFace template;
                            a loose scale: a smile lifts the mouth corners)
                    (each term clipped to [0, 1])
    sharpness   k = v_L / (v_L + 100), v_L = variance of the 3x3 Laplacian of the 112x112 aligned crop in
                    grey levels 0..255 (Pech-Pacheco et al. 2000; about 300-1500 for sharp photo crops,
                    under 50 for a blurred one)

    quality Q = v * (0.15 c + 0.15 s + 0.35 f + 0.35 k)

Visibility multiplies (a half face is a bad template however sharp it is); the weights favour the two
terms that matter most for a template a recogniser and a fusion pass will compare against: pose and
detail. Images are numpy float32 (H, W, 3) in [0, 1]; landmarks (5, 2): left eye, right eye, nose,
left and right mouth corner (image-left first), as in ``py/faces/types.Faces``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

WEIGHTS = {"confidence": 0.15, "size": 0.15, "frontality": 0.35, "sharpness": 0.35}
SIZE_RANGE = (32.0, 256.0)  # box side (px) scored 0 .. 1 on a log scale
SHARPNESS_HALF = 100.0  # Laplacian variance that scores 0.5
PITCH_REF = (71.7366 - 51.6) / (92.285 - 51.6)  # nose height between eyes and mouth on the ArcFace template
VISIBILITY_GROW = 1.2


@dataclass(frozen=True)
class Quality:
    """One face's quality terms (each in [0, 1]) and the total."""

    total: float
    confidence: float
    size: float
    visibility: float
    frontality: float
    sharpness: float
    yaw: float
    roll: float
    pitch: float
    laplacian_var: float

    def describe(self) -> str:
        return (f"Q={self.total:.3f} (conf {self.confidence:.2f}, size {self.size:.2f}, visible "
                f"{self.visibility:.2f}, frontal {self.frontality:.2f} [yaw {self.yaw:.2f} roll {self.roll:.2f} "
                f"pitch {self.pitch:.2f}], sharp {self.sharpness:.2f} [lapvar {self.laplacian_var:.0f}])")


def pose_terms(landmarks: np.ndarray) -> tuple[float, float, float]:
    """(yaw, roll, pitch) deviations in [0, 1] from the 5 landmarks (0 = frontal, upright, level)."""
    lm = np.asarray(landmarks, np.float64)
    le, re = lm[0], lm[1]
    d = re - le
    eye_dist = float(np.hypot(*d))
    if eye_dist < 1e-6:
        return 1.0, 1.0, 1.0
    angle = math.atan2(d[1], d[0])
    c, s = math.cos(-angle), math.sin(-angle)
    rot = np.array([[c, -s], [s, c]])  # image -> face frame (eye line horizontal)
    mid_eye = (le + re) / 2.0
    p = (lm - mid_eye) @ rot.T
    nose_p, mouth_p = p[2], (p[3] + p[4]) / 2.0
    yaw = min(1.0, abs(nose_p[0]) / (eye_dist / 2.0))
    roll = min(1.0, abs(angle) / (math.pi / 4))
    if mouth_p[1] <= 1e-6:  # mouth above the eyes: upside down or broken landmarks
        return yaw, roll, 1.0
    pitch = min(1.0, abs(nose_p[1] / mouth_p[1] - PITCH_REF) / 0.5)
    return yaw, roll, pitch


def frontality(landmarks: np.ndarray) -> float:
    """1 for a frontal, upright, level face; yaw counts most (see the module docstring)."""
    yaw, roll, pitch = pose_terms(landmarks)
    return float(np.clip(1.0 - 0.6 * yaw - 0.2 * roll - 0.2 * pitch, 0.0, 1.0))


def laplacian_variance(crop: np.ndarray) -> float:
    """Variance of the 3x3 Laplacian of a (H, W, 3) [0, 1] crop in grey levels 0..255."""
    grey = cv2.cvtColor(np.ascontiguousarray(crop, np.float32), cv2.COLOR_RGB2GRAY) * 255.0
    return float(cv2.Laplacian(grey, cv2.CV_32F, ksize=1).var())


def size_term(box: np.ndarray) -> float:
    side = float(max(box[2] - box[0], box[3] - box[1]))
    lo, hi = (math.log(v) for v in SIZE_RANGE)
    return float(np.clip((math.log(max(side, 1.0)) - lo) / (hi - lo), 0.0, 1.0))


def visibility(box: np.ndarray, image_size: tuple[int, int], grow: float = VISIBILITY_GROW) -> float:
    """Fraction of the face box, grown by ``grow`` around its centre, that lies inside the (H, W) image."""
    h, w = image_size
    cx, cy = (box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0
    hw, hh = (box[2] - box[0]) * grow / 2.0, (box[3] - box[1]) * grow / 2.0
    area = 4.0 * hw * hh
    if area <= 0:
        return 0.0
    ix = max(0.0, min(cx + hw, w) - max(cx - hw, 0.0))
    iy = max(0.0, min(cy + hh, h) - max(cy - hh, 0.0))
    return float(ix * iy / area)


def face_quality(score: float, box: np.ndarray, landmarks: np.ndarray, aligned_crop: np.ndarray,
                 image_size: tuple[int, int]) -> Quality:
    """The quality of one face (formula in the module docstring). aligned_crop: the 112x112 ArcFace crop."""
    box = np.asarray(box, np.float64)
    yaw, roll, pitch = pose_terms(landmarks)
    f = frontality(landmarks)
    lap = laplacian_variance(aligned_crop)
    k = lap / (lap + SHARPNESS_HALF)
    c = float(np.clip(score, 0.0, 1.0))
    s = size_term(box)
    v = visibility(box, image_size)
    total = 0.0 if c <= 0.0 else v * (WEIGHTS["confidence"] * c + WEIGHTS["size"] * s
                                      + WEIGHTS["frontality"] * f + WEIGHTS["sharpness"] * k)
    return Quality(float(total), c, s, v, f, float(k), yaw, roll, pitch, lap)


def rank_faces(qualities: list[Quality]) -> list[int]:
    """Indices best first (stable: on a tie the earlier face wins)."""
    return sorted(range(len(qualities)), key=lambda i: -qualities[i].total)
