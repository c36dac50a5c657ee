"""insightface-format face swap models (``inswapper_128.onnx`` and graphs of the same signature) for face fusion.

I/O as insightface's ``model_zoo/inswapper.py`` (``INSwapper.get``), which this mirrors:

- ``target``: (1, 3, 128, 128) float32, the face cut with ``face_align.norm_crop2(img, kps, 128)``, RGB, scaled
  by ``(x - input_mean) / input_std`` with input_mean 0 and input_std 255, i.e. RGB in [0, 1];
- ``source``: (1, D) float32, the identity latent ``l = normalize(normalize(e) @ emap)`` where ``e`` is the
  ArcFace embedding of the identity to put in and ``emap`` (D_e, D) is the graph's *last initializer*;
- output: (1, 3, 128, 128) RGB in [0, 1] (clipped).

The 128 crop is insightface's ``estimate_norm(kps, 128)``: the 112 ArcFace template scaled by 128/128 and
shifted 8 px right, so its matrix is ``T(8, 0) o A`` with A the face's 112-px ArcFace alignment (a least-squares
similarity fit commutes with translating the destination points). Pasting back goes through the inverse of that
matrix with a soft mask (``align.paste_back``). The initialiser is read straight from the protobuf, without the
``onnx`` package (``onnx_pack``'s wire-format reader). Images are numpy float32 (H, W, 3) in [0, 1].
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..faces import onnx_pack
from ..faces.align import ARCFACE_SIZE, paste_back, warp_crop
from .fusion import ellipse_mask

SWAP_SIZE = 128
SWAP_SHIFT_X = 8.0  # insightface face_align.estimate_norm: image_size % 128 == 0 -> diff_x = 8 * ratio


def swap_affine(affine_arcface: np.ndarray) -> np.ndarray:
    """(2, 3) image -> 128-px swap crop matrix: the 112 ArcFace alignment shifted 8 px right."""
    m = np.asarray(affine_arcface, np.float64).copy()
    m[0, 2] += SWAP_SHIFT_X
    return m.astype(np.float32)


def swap_mask(feather: float, scale: float = 0.85) -> np.ndarray:
    """(128, 128) soft inner-face ellipse in the swap crop: the head ellipse of the 112 ArcFace crop (``fusion.
    ellipse_mask`` at context 1), shrunk to ``scale`` so it stays on the face, moved by the crop's 8-px shift."""
    inner = ellipse_mask(1.0, ARCFACE_SIZE, feather, scale=scale)
    out = np.zeros((SWAP_SIZE, SWAP_SIZE), np.float32)
    s = int(SWAP_SHIFT_X)
    out[:ARCFACE_SIZE, s:s + ARCFACE_SIZE] = inner
    return out


def is_swapper_io(inputs: list[list], n_outputs: int) -> bool:
    """inswapper's signature: two inputs, (N, 3, 128, 128) and (N, D), one output."""
    if n_outputs != 1 or len(inputs) != 2:
        return False
    a, b = inputs
    return len(a) == 4 and list(a[1:]) == [3, SWAP_SIZE, SWAP_SIZE] and len(b) == 2 and isinstance(b[1], int)


_IS_SWAPPER: dict[tuple[str, int, int], bool] = {}


def is_swapper_file(path: str | os.PathLike) -> bool:
    """Whether an ONNX file has inswapper's signature (read from its graph; cached per path, size and mtime, as
    the dropdown is rebuilt for every prompt)."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _IS_SWAPPER:
        try:
            ins, n_out = onnx_pack.onnx_io(path)
            _IS_SWAPPER[key] = is_swapper_io(ins, n_out)
        except (ValueError, IndexError, OSError):
            _IS_SWAPPER[key] = False
    return _IS_SWAPPER[key]


def _candidates(roots: list[str | os.PathLike]) -> list[tuple[str, Path]]:
    """(dropdown name, path) of every .onnx file in a root, its models/ folder or one pack folder below."""
    out = {}
    for root in map(Path, roots):
        for base in (root, root / "models"):
            if not base.is_dir():
                continue
            for p in sorted(base.glob("*.onnx")):
                out.setdefault(p.name, p)
            for p in sorted(base.glob("*/*.onnx")):
                if p.parent.name != "models":
                    out.setdefault(f"{p.parent.name}/{p.name}", p)
    return sorted(out.items())


def list_swappers(roots: list[str | os.PathLike]) -> list[str]:
    """Dropdown names of the swap models (inswapper signature) in the insightface folders."""
    return [name for name, p in _candidates(roots) if p.is_file() and is_swapper_file(p)]


def resolve_swapper(roots: list[str | os.PathLike], name: str) -> Path:
    for n, p in _candidates(roots):
        if n == name:
            return p
    raise FileNotFoundError(f"swap model {name!r} not found in the insightface folders {[str(r) for r in roots]}: "
                            "put inswapper_128.onnx into models/insightface/.")


def _floats(buf, s: int, e: int) -> np.ndarray:
    return np.frombuffer(bytes(buf[s:e]), dtype="<f4").copy()


def last_initializer(path: str | os.PathLike) -> np.ndarray:
    """The graph's last initialiser as float32 (insightface: ``numpy_helper.to_array(graph.initializer[-1])``).

    onnx.proto: GraphProto.initializer = 5; TensorProto.dims = 1 (int64, packed or not), data_type = 2
    (1 = FLOAT), float_data = 4 (packed), name = 8, raw_data = 9 (little-endian).
    """
    def fn(buf):
        gs, ge = onnx_pack._graph(buf)
        inits = onnx_pack._sub(buf, gs, ge, 5)
        if not inits:
            raise ValueError("the graph has no initialisers (no emap)")
        s, e = inits[-1]
        dims, dtype, data = [], 1, None
        for num, value, a, b in onnx_pack._fields(buf, s, e):
            if num == 1:
                if value is not None:
                    dims.append(value)
                else:  # packed varints
                    i = a
                    while i < b:
                        v, i = onnx_pack._varint(buf, i)
                        dims.append(v)
            elif num == 2 and value is not None:
                dtype = value
            elif num in (4, 9) and value is None:
                data = _floats(buf, a, b)
            elif num == 4:  # an unpacked float field: fixed32 is skipped by the reader
                raise ValueError("unpacked float_data is not supported")
        if dtype != 1 or data is None:
            raise ValueError(f"the last initialiser is not float32 data (data_type {dtype})")
        return data.reshape(dims)
    return onnx_pack._read(path, fn)


def swap_latent(embedding: np.ndarray, emap: np.ndarray) -> np.ndarray:
    """(1, D) source input: normalize(normalize(e) @ emap), as INSwapper.get."""
    e = np.asarray(embedding, np.float64).reshape(1, -1)
    e = e / max(float(np.linalg.norm(e)), 1e-12)
    lat = e @ np.asarray(emap, np.float64)
    return (lat / max(float(np.linalg.norm(lat)), 1e-12)).astype(np.float32)


class Swapper:
    """An onnxruntime session of a swap model plus its emap."""

    def __init__(self, path: str | os.PathLike, session=None):
        """``session``: an onnxruntime session (or ``onnx_pack.SessionModule``) for ``path``; a CPU one by default.
        The nodes pass one from their model cache, which frees it with ComfyUI's model management."""
        self.path = Path(path)
        self.session = session if session is not None else onnx_pack.make_session(self.path)
        self.emap = last_initializer(self.path)
        ins = self.session.get_inputs()
        if len(ins) != 2 or self.emap.ndim != 2:
            raise ValueError(f"{self.path.name} is not an inswapper-style model (inputs target + source, 2-d emap)")
        self.target_name, self.source_name = ins[0].name, ins[1].name

    @property
    def embed_dim(self) -> int:
        return int(self.emap.shape[0])

    def run(self, crop: np.ndarray, latent: np.ndarray) -> np.ndarray:
        """(128, 128, 3) RGB [0, 1] crop + (1, D) latent -> (128, 128, 3) swapped face in [0, 1]."""
        blob = np.ascontiguousarray(crop.transpose(2, 0, 1)[None], np.float32)  # (x - 0) / 255 of 0..255 pixels
        pred = self.session.run(None, {self.target_name: blob, self.source_name: latent.astype(np.float32)})[0]
        return np.clip(np.asarray(pred, np.float32)[0].transpose(1, 2, 0), 0.0, 1.0)


def swap_face(image: np.ndarray, affine_arcface: np.ndarray, swapper: Swapper, latent: np.ndarray,
              mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One face swapped: (image with the swapped face pasted back, alpha in image space, the 128 swap output)."""
    m = swap_affine(affine_arcface)
    face = swapper.run(warp_crop(image, m, SWAP_SIZE), latent)
    out, alpha = paste_back(image, face, m, mask)
    return out, alpha, face

