"""Real photos through the pack's face nodes, for node tests: load, letterbox, batch, detect, embed.

Needs the pack imported as ``facecond`` (tests/conftest.py does it) and the stand-in insightface test pack in the
models folder (the ``stand_in_models`` fixture) for ``embed_faces``' default recogniser.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

REC = "testpack/mobilefacenet_128.onnx"  # the real small recogniser of ../shared/data's insightface test pack


def photo_array(shared_data: Path, rel: str) -> np.ndarray:
    """``shared_data/faces/rel`` as float32 RGB in [0, 1], (H, W, 3)."""
    return np.asarray(Image.open(shared_data / "faces" / rel).convert("RGB"), np.float32) / 255.0


def letterbox(a: np.ndarray, side: int) -> np.ndarray:
    """Fit into side x side keeping the aspect, centred on black."""
    h, w = a.shape[:2]
    f = side / max(h, w)
    r = np.clip(cv2.resize(a, (round(w * f), round(h * f)), interpolation=cv2.INTER_AREA), 0.0, 1.0)
    out = np.zeros((side, side, 3), np.float32)
    y, x = (side - r.shape[0]) // 2, (side - r.shape[1]) // 2
    out[y:y + r.shape[0], x:x + r.shape[1]] = r
    return out


def image_batch(arrs) -> torch.Tensor:
    """Same-size (H, W, 3) arrays -> a ComfyUI IMAGE batch (B, H, W, 3)."""
    return torch.from_numpy(np.stack(arrs).astype(np.float32))


def detect_faces(image, no_face="passthrough", **kw):
    """FaceDetectCrop with MTCNN, the largest face per image, under inference mode as ComfyUI runs nodes."""
    from facecond.nodes.faces.detect_embed import FacecondFaceDetectCrop

    args = {"detector": "mtcnn", "select": "largest", "face_index": 0, "min_size": 40, "margin_scale": 1.0,
            "upright": "rotate_if_no_face", "no_face": no_face, **kw}
    with torch.inference_mode():
        return FacecondFaceDetectCrop().detect(image, **args)[0]


def embed_faces(faces, model: str = REC):
    """FaceEmbed with the test pack's recogniser (L2-normalised)."""
    from facecond.nodes.faces.detect_embed import FacecondFaceEmbed

    with torch.inference_mode():
        return FacecondFaceEmbed().embed(faces, model=model, facenet_layer="bottleneck_512", normalize="auto")[0]
