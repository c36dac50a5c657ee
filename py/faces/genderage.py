"""Gender and age of a face with an insightface ``genderage`` model (buffalo_l / antelopev2 ``genderage.onnx``).

Written after insightface's ``model_zoo/attribute.py`` (``Attribute.get``), so the same file gives the same
answer here as in insightface:

- crop: centred on the detector box, scale ``s = 96 / (1.5 * max(w, h))`` (the box and half as much again fill
  the 96 px input), ``cv2.warpAffine`` (bilinear, black outside) of the uint8 photo; insightface passes no
  rotation (``face_align.transform(..., rotate=0)``); here a face found on its side can be turned upright by a
  multiple of 90 degrees about the box centre (``rotation``, as that transform's rotation argument);
- blob: ``(pixel - mean) / std`` in RGB, NCHW, where (mean, std) is (0, 1) for models converted from MXNet
  (Sub and Mul nodes among the first eight, or a ``bn_data`` node among the first three) and (127.5, 128)
  otherwise;
- output ``[p_female, p_male, age / 100]``: gender = argmax of the first two (insightface: 1 = male),
  age = round(100 * third).

The session is any onnxruntime session (the node passes one from its model cache, ``nodes/model_cache.py``);
onnxruntime is imported lazily in ``py/faces/onnx_pack.py``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import cv2
import numpy as np

from . import onnx_pack

INPUT_SIZE = 96  # insightface's genderage input (onnx_pack.classify_shapes: square 96 = genderage)
BOX_CONTEXT = 1.5  # attribute.py: _scale = input_size / (max(w, h) * 1.5)


@dataclass(frozen=True)
class GenderAge:
    p_female: float
    p_male: float
    age: int  # years, round(100 * output[2])

    @property
    def gender(self) -> str:
        return "male" if self.p_male > self.p_female else "female"  # argmax; a tie is female, as np.argmax

    def describe(self) -> str:
        return f"{self.gender}, age {self.age} (p_female {self.p_female:.3f}, p_male {self.p_male:.3f})"


def normalisation(path: str | os.PathLike) -> tuple[float, float]:
    """(mean, std) of the model's input in 0..255 pixels: insightface attribute.py's rule (see module doc)."""
    nodes = onnx_pack.first_node_names(path, 8)
    has_sub = any(n.startswith(("Sub", "_minus")) for n, _ in nodes)
    has_mul = any(n.startswith(("Mul", "_mul")) for n, _ in nodes)
    if any(n == "bn_data" for n, _ in nodes[:3]):
        has_sub = has_mul = True
    return (0.0, 1.0) if has_sub and has_mul else (127.5, 128.0)


def crop_matrix(box, size: int = INPUT_SIZE, rotation: float = 0.0) -> np.ndarray:
    """(2, 3) photo -> input-crop matrix for the detector box (x1, y1, x2, y2) in pixels, turned by ``rotation``
    degrees about the box centre (insightface face_align.transform: scale, centre, rotate, re-centre)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    w, h = x2 - x1, y2 - y1
    if not (w > 0 and h > 0):
        raise ValueError(f"genderage: face box {tuple(box)} has no area")
    s = size / (max(w, h) * BOX_CONTEXT)
    cx, cy = (x1 + x2) / 2.0, (y1 + y2) / 2.0
    r = np.radians(rotation)
    a = s * np.array([[np.cos(r), -np.sin(r)], [np.sin(r), np.cos(r)]])
    if rotation % 90 == 0:
        a = np.round(a / s) * s  # exact quarter turns (cos 90 is 6e-17 in floating point)
    return np.hstack([a, (size / 2.0 - a @ np.array([cx, cy]))[:, None]])


def to_uint8(image: np.ndarray) -> np.ndarray:
    """A (H, W, 3) float image in 0..1 as the uint8 photo insightface reads."""
    return np.clip(np.rint(np.asarray(image, np.float32) * 255.0), 0, 255).astype(np.uint8)


def blob(image_u8: np.ndarray, box, mean: float, std: float, size: int = INPUT_SIZE,
         rotation: float = 0.0) -> np.ndarray:
    """(1, 3, size, size) float32 network input for one face of an RGB uint8 photo."""
    crop = cv2.warpAffine(image_u8, crop_matrix(box, size, rotation), (size, size), borderValue=0.0)
    x = (crop.astype(np.float32) - np.float32(mean)) / np.float32(std)  # cv2.dnn.blobFromImage, already RGB
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def upright_rotation(affine_arcface: np.ndarray) -> float:
    """The quarter turn (0, 90, 180 or -90 degrees) nearest to the turn of a face's aligned crop: 0 for faces
    within 45 degrees of upright (insightface's crop exactly), else what stands a face on its side upright."""
    m = np.asarray(affine_arcface, np.float64)
    quarter = round(float(np.degrees(np.arctan2(m[1, 0], m[0, 0]))) / 90.0)
    return 180.0 if abs(quarter) == 2 else 90.0 * quarter


def predict(session, image_u8: np.ndarray, box, mean: float, std: float, rotation: float = 0.0) -> GenderAge:
    """Gender and age of the face in ``box`` of an RGB uint8 photo through an onnxruntime session."""
    inp = session.get_inputs()[0]
    size = inp.shape[2] if isinstance(inp.shape[2], int) else INPUT_SIZE
    x = blob(image_u8, box, mean, std, size, rotation)
    out = np.asarray(session.run(None, {inp.name: x})[0], np.float32).reshape(-1)
    if out.shape[0] != 3:
        raise ValueError(f"genderage: the model gave {out.shape[0]} numbers per face; a genderage model gives 3 "
                         "(p_female, p_male, age/100)")
    return GenderAge(p_female=float(out[0]), p_male=float(out[1]), age=int(np.round(out[2] * 100)))
