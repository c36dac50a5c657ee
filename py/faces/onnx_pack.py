"""insightface model packs: find them on disk, open their ONNX files with onnxruntime, tell them apart.

A pack is a folder of ONNX files (buffalo_l, antelopev2, ...) at ``<root>/models/NAME/*.onnx``.
The classic mistake of unzipping antelopev2 into itself (``<root>/models/NAME/NAME/*.onnx``) is
accepted too. Files are classified by their input/output shapes, as insightface's model_zoo does
(`insightface/model_zoo/model_zoo.py`, `get_model`): >= 5 outputs: SCRFD detector; square input
>= 112: recogniser; 192: 2d/3d landmarks; 96: gender/age. onnxruntime is imported lazily.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from ..weights.manifest import file_identity

log = logging.getLogger("facecond")

ORT_HINT = ("onnxruntime is not installed; insightface models need it. Install it into ComfyUI's Python: "
            "`python -m pip install onnxruntime` (or `onnxruntime-gpu` on an NVIDIA GPU), then restart ComfyUI.")


def import_ort():
    try:
        import onnxruntime
    except ImportError as e:
        raise RuntimeError(ORT_HINT) from e
    return onnxruntime


def providers(cuda: bool = True) -> list[str]:
    """CUDA first when asked for (the model device is a CUDA GPU) and onnxruntime offers it; always CPU as the
    fallback."""
    ort = import_ort()
    avail = ort.get_available_providers()
    wanted = ("CUDAExecutionProvider", "CPUExecutionProvider") if cuda else ("CPUExecutionProvider",)
    return [p for p in wanted if p in avail] or avail


DETECTOR_SIZE = 640  # SCRFD's input side, as FaceAnalysis.prepare(det_size=(640, 640)) sets it


def make_session(path: str | os.PathLike, cuda: bool = True):
    """An onnxruntime session for one file. A SCRFD detector (>= 5 outputs) whose input height and width are
    symbolic is opened with those dimensions fixed at DETECTOR_SIZE, as insightface 2.1's FaceAnalysis opens it
    (`model_zoo/scrfd.py`, a static-shape session per detection size): onnxruntime optimises a static graph
    differently, and a dynamic session's landmarks differ from FaceAnalysis's by one float32 step (3e-5 px),
    enough to move a few pixels of the 112 crop by one grey level. Fixed, they are bit-identical."""
    ort = import_ort()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    ins, n_out = onnx_io(path)  # read from the file: no throw-away session to learn the shapes
    if n_out >= 5 and ins and len(ins[0]) == 4:
        for name in sorted({d for d in ins[0][2:] if isinstance(d, str)}):  # an unnamed dimension matches no name
            opts.add_free_dimension_override_by_name(name, DETECTOR_SIZE)
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers(cuda))


class SessionModule(nn.Module):
    """An onnxruntime session as a torch module, so that a model manager that handles modules (ComfyUI's
    ModelPatcher) owns its lifetime: the session opens on first use and ``release()`` drops it (its memory,
    CUDA included, goes with it). It stands in for the session: ``get_inputs``, ``get_outputs``, ``run``."""

    def __init__(self, path: str | os.PathLike, cuda: bool = False):
        super().__init__()
        self.path, self.cuda = Path(path), cuda
        self.session = None
        self.register_buffer("_anchor", torch.zeros(1), persistent=False)  # a tensor, so managers see a device

    def open(self):
        if self.session is None:
            log.info("[facecond] loading %s with onnxruntime (%s)", self.path, ", ".join(providers(self.cuda)))
            self.session = make_session(self.path, self.cuda)
        return self.session

    def release(self) -> None:
        self.session = None

    def get_inputs(self):
        return self.open().get_inputs()

    def get_outputs(self):
        return self.open().get_outputs()

    def run(self, output_names, feeds):
        return self.open().run(output_names, feeds)


def classify(session) -> str:
    """Kind of a model from an onnxruntime session's shapes (insightface's rule, see classify_shapes)."""
    return classify_shapes(list(session.get_inputs()[0].shape), len(session.get_outputs()), len(session.get_inputs()))


def _pack_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.onnx") if p.is_file())


def find_pack(roots: list[str | os.PathLike], name: str) -> Path:
    """The folder holding pack NAME's ONNX files under any root (``root/models/NAME`` or one level off).

    Raises FileNotFoundError saying where it looked and what the layout must be.
    """
    looked = []
    for root in map(Path, roots):
        for cand in (root / "models" / name, root / "models" / name / name, root / name, root / name / name):
            looked.append(str(cand))
            if cand.is_dir() and _pack_files(cand):
                return cand
    raise FileNotFoundError(
        f"insightface pack '{name}' not found: no .onnx files in any of {looked}. Unzip the pack so its "
        f".onnx files sit directly in models/insightface/models/{name}/ (e.g. models/insightface/models/"
        f"{name}/scrfd_10g_bnkps.onnx).")


def list_packs(roots: list[str | os.PathLike]) -> list[str]:
    """Names of the packs found under the roots (either layout)."""
    names = set()
    for root in roots:
        for base in (Path(root) / "models", Path(root)):
            if not base.is_dir():
                continue
            for d in base.iterdir():
                if d.is_dir() and d.name != "models" and (_pack_files(d) or _pack_files(d / d.name)):
                    names.add(d.name)
    return sorted(names)


def list_models(roots: list[str | os.PathLike], kind: str) -> list[str]:
    """Dropdown entries ``PACK/FILE.onnx`` of every pack file of this kind, then loose ``FILE.onnx`` files
    lying directly in a root or its models/ folder (a recogniser downloaded on its own)."""
    out = []
    for name in list_packs(roots):
        folder = find_pack(roots, name)
        out += [f"{name}/{p.name}" for p in _pack_files(folder) if classify_file(p) == kind]
    loose = {p.name for r in roots for base in (Path(r), Path(r) / "models") if base.is_dir()
             for p in _pack_files(base) if classify_file(p) == kind}
    return sorted(set(out)) + sorted(loose - set(out))


def resolve_model(roots: list[str | os.PathLike], choice: str) -> Path:
    """The file behind a ``list_models`` entry; FileNotFoundError says where it looked."""
    if "/" in choice:
        pack, fname = choice.rsplit("/", 1)
        folder = find_pack(roots, pack)
        if folder.parent.name == folder.name:
            log.warning("[facecond] insightface pack %s is nested one level too deep (%s); it works, but "
                        "other tools expect models/insightface/models/%s/*.onnx", pack, folder, pack)
        path = folder / fname
        if path.is_file():
            return path
        raise FileNotFoundError(f"insightface pack '{pack}' at {folder} has no {fname} "
                                f"(it has: {', '.join(p.name for p in _pack_files(folder)) or 'nothing'}).")
    for r in roots:
        for base in (Path(r), Path(r) / "models"):
            if (base / choice).is_file():
                return base / choice
    raise FileNotFoundError(f"{choice} not found in the insightface model folders {[str(r) for r in roots]}.")


# ---- reading an ONNX file's graph without the `onnx` package (protobuf wire format) ----
# onnx.proto: ModelProto.graph = 7; GraphProto.node = 1, input = 11, output = 12; NodeProto.name = 3,
# op_type = 4; ValueInfoProto.type = 2; TypeProto.tensor_type = 1; Tensor.shape = 2; TensorShapeProto.dim = 1;
# Dimension.dim_value = 1, dim_param = 2.
def _varint(buf, i: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        b = buf[i]
        i += 1
        out |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return out, i


def _fields(buf, start: int, end: int):
    """(field number, value or None, start, end) of each field; value is set for varints."""
    i = start
    while i < end:
        tag, i = _varint(buf, i)
        num, wt = tag >> 3, tag & 7
        if wt == 0:
            v, i = _varint(buf, i)
            yield num, v, i, i
        elif wt in (1, 5):
            i += 8 if wt == 1 else 4
        elif wt == 2:
            n, i = _varint(buf, i)
            yield num, None, i, i + n
            i += n
        else:
            raise ValueError(f"unsupported protobuf wire type {wt}")


def _sub(buf, s: int, e: int, num: int):
    return [(a, b) for n, _, a, b in _fields(buf, s, e) if n == num]


def _graph(buf):
    g = _sub(buf, 0, len(buf), 7)
    if not g:
        raise ValueError("not an ONNX model (no graph)")
    return g[0]


def _shape(buf, s: int, e: int) -> list[int | str]:
    dims: list[int | str] = []
    for ts, te in _sub(buf, s, e, 2)[:1]:  # ValueInfo.type
        for ts2, te2 in _sub(buf, ts, te, 1)[:1]:  # tensor_type
            for ss, se in _sub(buf, ts2, te2, 2)[:1]:  # shape
                for ds, de in _sub(buf, ss, se, 1):  # dim
                    dim: int | str = "?"
                    for n, v, a, b in _fields(buf, ds, de):
                        dim = v if n == 1 else bytes(buf[a:b]).decode("utf-8", "replace") if n == 2 else dim
                    dims.append(dim)
    return dims


def _read(path, fn):
    import mmap

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        return fn(buf)


def onnx_io(path: str | os.PathLike) -> tuple[list[list[int | str]], int]:
    """(shapes of the graph inputs that are not initialisers, number of outputs), read from the file."""
    def fn(buf):
        gs, ge = _graph(buf)
        init = {bytes(buf[a:b]) for s, e in _sub(buf, gs, ge, 5) for a, b in _sub(buf, s, e, 8)}
        ins = []
        for s, e in _sub(buf, gs, ge, 11):
            names = [bytes(buf[a:b]) for a, b in _sub(buf, s, e, 1)]
            if not names or names[0] not in init:
                ins.append(_shape(buf, s, e))
        return ins, len(_sub(buf, gs, ge, 12))
    return _read(path, fn)


def classify_shapes(input_shape: list, n_outputs: int, n_inputs: int = 1) -> str:
    """'detection', 'recognition', 'landmark', 'genderage', 'swap' or 'unknown' (insightface model_zoo's rule:
    two inputs at 128x128 is an inswapper-style face swap, not a recogniser)."""
    if n_outputs >= 5:
        return "detection"
    hw = list(input_shape[2:4])
    if n_inputs == 2 and hw == [128, 128]:
        return "swap"
    if len(hw) == 2 and hw[0] == hw[1] and isinstance(hw[0], int):
        return {192: "landmark", 96: "genderage"}.get(hw[0], "recognition" if hw[0] >= 112 else "unknown")
    return "unknown"


_KINDS: dict[tuple[str, int, int], str] = {}


def classify_file(path: str | os.PathLike) -> str:
    """Kind of an ONNX file from its graph (no onnxruntime needed); cached per (path, size, mtime)."""
    key = file_identity(path)
    if key not in _KINDS:
        try:
            ins, n_out = onnx_io(path)
            _KINDS[key] = classify_shapes(ins[0] if ins else [], n_out, len(ins))
        except (ValueError, IndexError, OSError) as e:
            log.warning("[facecond] could not read %s as ONNX: %s", path, e)
            _KINDS[key] = "unknown"
    return _KINDS[key]


def first_node_names(path: str | os.PathLike, count: int = 8) -> list[tuple[str, str]]:
    """(name, op_type) of the first graph nodes."""
    def fn(buf):
        gs, ge = _graph(buf)
        out = []
        for s, e in _sub(buf, gs, ge, 1)[:count]:
            fields = {n: bytes(buf[a:b]).decode("utf-8", "replace") for n, _, a, b in _fields(buf, s, e) if n in (3, 4)}
            out.append((fields.get(3, ""), fields.get(4, "")))
        return out
    return _read(path, fn)


def recogniser_normalisation(path: str | os.PathLike) -> tuple[float, float]:
    """(mean, std) of a recogniser's input in 0..255 pixels, insightface's rule (arcface_onnx.py):
    models converted from MXNet carry their own Sub and Mul nodes near the input and take raw pixels
    (0, 1); the others take (x - 127.5) / 127.5.
    """
    nodes = first_node_names(path)
    has_sub = any(n.startswith(("Sub", "_minus")) for n, _ in nodes)
    has_mul = any(n.startswith(("Mul", "_mul")) for n, _ in nodes)
    return (0.0, 1.0) if has_sub and has_mul else (127.5, 127.5)
