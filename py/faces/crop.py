"""Detect, select, upright and crop: an IMAGE batch in, a ``Faces`` out.

The orchestration behind FaceDetectCrop, independent of ComfyUI: any detector with
``detect(images (B, H, W, 3) float32 0..255, min_size) -> list[Detections]`` works.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from .align import (
    ARCFACE_DST,
    ARCFACE_SIZE,
    FACENET_SIZE,
    arcface_affine,
    box_of_points,
    eye_angle,
    face0_affine,
    norm_crop,
    norm_crop_matrix,
    rot90_points,
    transform_points,
    warp_crop,
)
from .detect import PREPROCESS_MODES, Detections, filter_min_size, select, to_uint8
from .types import Faces

log = logging.getLogger("facecond")

SELECT_MODES = ("largest", "all", "index")
UPRIGHT_MODES = ("rotate_if_no_face", "off", "rotate_and_level")
NO_FACE_POLICIES = ("error", "skip", "passthrough")


class NoFaceError(ValueError):
    pass


@dataclass
class Found:
    """One face in source-image coordinates, plus its upright frame (for the Face0 crop)."""

    box: np.ndarray  # (4,) axis-aligned in the image
    landmarks: np.ndarray  # (5, 2)
    score: float
    upright_wh: tuple[float, float]  # detector box size in the face's upright frame
    center: tuple[float, float]
    angle: float  # roll used for the Face0 crop (radians)


@dataclass
class CropResult:
    faces: Faces
    per_image: list[list[Found]] = field(default_factory=list)  # what the preview/mask draw
    report: str = ""


def _found(det: Detections, k: int, h: int, w: int, level: bool) -> list[Found]:
    """Detections made in ``rot90(image, k)`` mapped back into the h x w image."""
    out = []
    for box, lm, sc in zip(det.boxes, det.landmarks, det.scores):
        bw, bh = float(box[2] - box[0]), float(box[3] - box[1])
        corners = np.array([[box[0], box[1]], [box[2], box[1]], [box[2], box[3]], [box[0], box[3]]], np.float32)
        corners = rot90_points(corners, k, h, w)
        lm_img = rot90_points(lm, k, h, w)
        center = corners.mean(0)
        angle = eye_angle(lm_img) if (k % 4 or level) else 0.0
        out.append(Found(box_of_points(corners), lm_img, float(sc), (bw, bh), (float(center[0]), float(center[1])),
                         angle))
    return out


def roll(landmarks: np.ndarray) -> float:
    """How far a face is turned from upright (radians, 0 = upright, +-pi = upside down), from the direction
    eye-centre -> mouth-centre; robust to a detector swapping left/right labels on a turned face."""
    eyes, mouth = landmarks[:2].mean(0), landmarks[3:5].mean(0)
    dx, dy = mouth - eyes
    return float(np.arctan2(-dx, dy))


def _is_upright(det: Detections) -> bool:
    return all(abs(roll(lm)) < np.pi / 4 for lm in det.landmarks)


def detect_faces(detector, images: np.ndarray, *, min_size: int, select_mode: str, face_index: int,
                 upright: str, progress: Callable[[int], None] | None = None,
                 preprocess: str = "facecond") -> list[list[Found]]:
    """Per image, the selected faces. images: (B, H, W, 3) float32 0..255. preprocess: the detector's input
    resize ("facecond" or "insightface", see ``detect``).

    Upright correction (FaceChain's input processing): when no face is found, or the faces found lie on
    their side or upside down (judged from the landmarks), the image is detected again turned by a quarter,
    three quarters and a half turn; the turn with the most confident upright face wins, and its faces are
    cropped upright along their eye line.
    """
    b, h, w = images.shape[:3]
    level = upright == "rotate_and_level"
    if preprocess not in PREPROCESS_MODES:
        raise ValueError(f"detect_faces: unknown preprocess {preprocess!r}; one of {PREPROCESS_MODES}")
    kw = {"preprocess": preprocess} if preprocess != "facecond" else {}  # any detect(images, min_size) works
    dets = detector.detect(images, min_size, **kw)
    result: list[list[Found]] = []
    for i in range(b):
        det = select(filter_min_size(dets[i], min_size), select_mode, face_index)
        found = _found(det, 0, h, w, level)
        if upright != "off" and (not len(det) or not _is_upright(det)):
            best = 0.0
            for k in (1, 3, 2):
                rot = np.ascontiguousarray(np.rot90(images[i], k))
                det_k = select(filter_min_size(detector.detect(rot[None], min_size, **kw)[0], min_size), select_mode,
                               face_index)
                # MTCNN also fires on upside-down faces (lower scores, meaningless landmarks): keep the best turn
                if len(det_k) and _is_upright(det_k) and float(det_k.scores.max()) > best:
                    best, found = float(det_k.scores.max()), _found(det_k, k, h, w, level)
                    log.info("[facecond] image %d: upright faces found after turning it %d degrees", i, 90 * k)
        result.append(found)
        if progress is not None:
            progress(i)
    return result


def _passthrough(h: int, w: int) -> Found:
    """The centre square of the image standing in for a face (score 0)."""
    side = float(min(h, w))
    x0, y0 = (w - side) / 2.0, (h - side) / 2.0
    lm = ARCFACE_DST * (side / ARCFACE_SIZE) + np.array([x0, y0], np.float32)
    return Found(np.array([x0, y0, x0 + side, y0 + side], np.float32), lm.astype(np.float32), 0.0,
                 (side, side), (w / 2.0, h / 2.0), 0.0)


def crop_faces(images01: np.ndarray, per_image: list[list[Found]], *, no_face: str, margin_scale: float,
               detector_name: str, node: str = "FaceDetectCrop", min_size: int = 0,
               select_mode: str = "largest", face_index: int = 0, preprocess: str = "facecond",
               dlib_chips=None) -> CropResult:
    """Apply the no-face policy and cut both crops of every face. images01: (B, H, W, 3) float32 in [0, 1].

    preprocess: how the 112 ArcFace crop is cut. "facecond": ``warp_crop`` (area-averaged first when
    shrinking, float). "insightface": insightface's ``norm_crop`` exactly: the image as uint8, one plain
    warpAffine with the float64 similarity transform, the uint8 crop / 255. The FaceNet crop is the same in both.
    dlib_chips: a ``dlib_rec.DlibRecogniser`` (its shape predictor): also cut dlib's 150-px chips (``crops_dlib``).
    """
    if preprocess not in PREPROCESS_MODES:
        raise ValueError(f"{node}: unknown preprocess {preprocess!r}; one of {PREPROCESS_MODES}")
    exact = preprocess == "insightface"
    b, h, w = images01.shape[:3]
    missing = [i for i, f in enumerate(per_image) if not f]
    if missing and no_face == "error":
        i = missing[0]
        what = f"no face at face_index={face_index}" if select_mode == "index" else "no face found"
        raise NoFaceError(
            f"{node}: {what} in image {i} of {b} (min_size={min_size}; images without a face: {missing}). "
            f"Lower min_size or crop closer, or set no_face='skip' to drop such images "
            f"or no_face='passthrough' to use the whole image.")
    if no_face == "passthrough":
        per_image = [f or [_passthrough(h, w)] for f in per_image]
    if len(missing) == b and no_face == "skip":
        raise NoFaceError(f"{node}: no face found in any of the {b} images (min_size={min_size}); "
                          f"no_face='skip' leaves nothing. Lower min_size, or set no_face='passthrough'.")
    rows = [(i, f) for i, fs in enumerate(per_image) for f in fs]
    u8 = {i: to_uint8(images01[i] * 255.0) for i in {i for i, _ in rows}} if exact or dlib_chips else {}
    chips = [dlib_chips.chip(u8[i], f.box).astype(np.float32) / 255.0 for i, f in rows] if dlib_chips else None
    fn, arc, boxes, lms, scores, afn, aarc = [], [], [], [], [], [], []
    for i, f in rows:
        m_fn = face0_affine(f.upright_wh, f.center, f.angle, margin_scale, FACENET_SIZE)
        m_arc = arcface_affine(f.landmarks, ARCFACE_SIZE)
        fn.append(warp_crop(images01[i], m_fn, FACENET_SIZE))
        if exact:
            m64 = norm_crop_matrix(f.landmarks, ARCFACE_SIZE)
            arc.append(norm_crop(u8[i], m64, ARCFACE_SIZE).astype(np.float32) / 255.0)
        else:
            arc.append(warp_crop(images01[i], m_arc, ARCFACE_SIZE))
        boxes.append(f.box)
        lms.append(f.landmarks)
        scores.append(f.score)
        afn.append(m_fn)
        aarc.append(m_arc)

    def stack(xs, shape):
        return torch.from_numpy(np.stack(xs).astype(np.float32)) if xs else torch.zeros(shape)

    faces = Faces(
        crops_facenet=stack(fn, (0, FACENET_SIZE, FACENET_SIZE, 3)).clamp(0, 1),
        crops_arcface=stack(arc, (0, ARCFACE_SIZE, ARCFACE_SIZE, 3)).clamp(0, 1),
        boxes=stack(boxes, (0, 4)), landmarks=stack(lms, (0, 5, 2)),
        scores=torch.tensor(scores, dtype=torch.float32),
        affine_facenet=stack(afn, (0, 2, 3)), affine_arcface=stack(aarc, (0, 2, 3)),
        source_index=tuple(i for i, _ in rows), image_size=(h, w), num_images=b, detector=detector_name,
        skipped=tuple(missing) if no_face == "skip" else (), preprocess=preprocess,
        crops_dlib=None if chips is None else stack(chips, (0, 150, 150, 3)),
    )
    counts = [len(f) for f in per_image]
    lines = [f"{detector_name}: {len(rows)} face(s) in {b} image(s)"]
    for i, fs in enumerate(per_image):
        if i in missing:
            lines.append(f"image {i}: no face" + {"skip": " (skipped)", "passthrough": " (whole image passed through)"}
                         .get(no_face, ""))
        else:
            lines.append(f"image {i}: {counts[i]} face(s), scores " + ", ".join(f"{f.score:.3f}" for f in fs))
    if missing and no_face == "skip":
        log.warning("[facecond] %s: no face in image(s) %s; skipped", node, missing)
    return CropResult(faces, per_image, "\n".join(lines))


def crop_points(faces: Faces, row: int, which: str = "arcface") -> np.ndarray:
    """The 5 landmarks of a face in its crop's coordinates (a check that the crop is aligned)."""
    m = (faces.affine_arcface if which == "arcface" else faces.affine_facenet)[row].numpy()
    return transform_points(m, faces.landmarks[row].numpy())
