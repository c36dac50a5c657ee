"""One safe reader for the pack's own files (projections, embeddings, coefficients, MLPs, aggregators, adapters).

Every low-level failure becomes one ``PackFileError`` carrying the path, what was wrong, what was expected and
found, and the fix. The file is checked before ``safetensors`` sees it, so the message says *why* it is not
readable instead of ``header too large``:

- missing, a folder, or empty;
- a pickle or a torch zip (``torch.save``) under a ``.safetensors`` name: refused, never unpickled
  (a pickle can run code when loaded);
- not a safetensors file at all (random bytes, text, an image): the 8-byte header length or the JSON
  header does not make sense;
- truncated: the header, or the tensor data it describes, runs past the end of the file;
- the wrong kind of file (``facecond.kind`` metadata) or tensors of the wrong shape (``shape_error``);
- checked before anything is allocated (``read``): the header at most ``MAX_PACK_HEADER`` bytes and
  ``MAX_TENSORS`` tensors, every tensor's dtype (floats: ``FLOAT_DTYPES``) and shape from the header, the
  loader's ``plan`` (shapes derived from the metadata, numbers within their bounds: ``packmeta.meta_int``); then,
  once read, every float tensor finite (no NaN/inf: ``check_finite``). Modules are built on the meta device and the
  checked tensors assigned (``packmeta.build``), so a refused file costs the server no more than its header.

Text from a file (metadata values, tensor names) appears in messages clipped to ``MAX_QUOTE`` characters.

Safetensors layout: 8 bytes little-endian header length N, N bytes of JSON header
(``{name: {dtype, shape, data_offsets: [start, end]}, "__metadata__": {...}}``), then the tensor data.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Callable, Mapping
from types import MappingProxyType

MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header
MAX_PACK_HEADER = 4 << 20  # a pack file's header (its metadata included): the largest real one, a 10,000-name
# Celeb Basis MLP, is ~0.3 MB; an IP-Adapter's ~0.05 MB. Parsing 4 MB of JSON costs < 0.1 s and < 60 MB.
MAX_TENSORS = 4096  # tensors in one file (an IP-Adapter FaceID file with its LoRA has ~ 300)
MAX_DIMS = 8  # dimensions of one tensor
MAX_QUOTE = 200  # characters of file text (metadata values, names) quoted in a message
FLOAT_DTYPES = ("F16", "BF16", "F32")  # what weights may be stored as (loaded as float32)
INT_DTYPES = ("I64", "I32")  # integer scalars (the aggregator's n_refs, heads)
ALL_FLOAT = MappingProxyType({})  # ``read(dtypes=...)``: every tensor float (None: any dtype, for others' files)
_ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
PICKLE_PROTOCOLS = (2, 3, 4, 5)

# facecond.kind -> (what it is called, what writes it)
KINDS = {
    "face0_projection": ("Face0 projection", "scripts/face0_train.py"),
    "face_embeds": ("face-embeddings file", "SaveFaceEmbeds"),
    "celeb_mlp": ("Celeb Basis coefficient MLP", "TrainCelebBasis"),
    "celeb_coeffs": ("Celeb Basis coefficients file", "SaveCelebCoeffs"),
    "celeb_faces": ("celebrity-face cache", "PrecomputeCelebFaces"),
    "face_ti": ("face textual-inversion embedding", "TrainFaceTI"),
}

FIXES = {
    "missing": "Put the file there, or pick another one (refresh the node list if it was removed).",
    "empty": "The file is incomplete (an interrupted copy, download or save): copy it again, or write it again "
             "with {writer}.",
    "truncated": "The file is incomplete (an interrupted copy, download or save): copy it again, or write it again "
                 "with {writer}.",
    "pickle": "It was not opened: pickles can run code when loaded. Use the .safetensors file written by {writer}, "
              "or convert a copy you trust to .safetensors yourself.",
    "not_safetensors": "Use the .safetensors file written by {writer}; the file there is something else.",
    "wrong_kind": "Pick a {label} (written by {writer}); this one is another kind of file.",
    "wrong_shape": "The file does not fit what a {label} holds: write it again with {writer}, or pick the file "
                   "made for this model.",
    "bad_metadata": "Its metadata is damaged or from an older tool: write it again with {writer}.",
    "wrong_dtype": "Weights are read from float16, bfloat16 or float32 tensors only (integer or float8 tensors are "
                   "not cast silently): write it again with {writer}, or convert its tensors to float32.",
    "non_finite": "The weights are broken (NaN/inf: a diverged training run or a damaged copy) and would give black "
                  "or noise images: train again (lower the learning rate) or use an earlier file from {writer}.",
    "too_large": "This is not a {label} of a size the pack uses (see README, Limits): pick the file made by "
                 "{writer}.",
}


def clip(text, limit: int = MAX_QUOTE) -> str:
    """``text`` (str() of it) cut to ``limit`` characters with the full length said: what a message may quote of
    a file's own text."""
    text = str(text)
    if len(text) <= limit:
        return text
    return f"{text[:limit - 40]}... ({len(text):,} characters in all)"



class PackFileError(ValueError):
    """A pack file that cannot be used. ``problem`` is a key of ``FIXES``; the message is complete by itself."""

    def __init__(self, path: str | os.PathLike, problem: str, what: str, *, expected: str | None = None,
                 found: str | None = None, label: str = "facecond file", writer: str = "the facecond pack"):
        what, expected, found = clip(what, 2 * MAX_QUOTE), expected and clip(expected, 300), found and clip(found, 300)
        self.path, self.problem, self.what = str(path), problem, what
        self.expected, self.found = expected, found
        self.fix = FIXES[problem].format(label=label, writer=writer)
        facts = f" (expected {expected}; found {found})" if expected or found else ""
        super().__init__(f"{self.path}: {what}{facts}. {self.fix}")


def out_of_memory(e: BaseException) -> bool:
    """An allocation failure rather than a bad file: Python's MemoryError, torch's out-of-memory error (CUDA, MPS,
    XPU) or the CPU allocator's. Loaders pass these through untouched, so ComfyUI's executor reports and handles
    them as its own (it unloads models on an out-of-memory error)."""
    import torch

    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                  getattr(torch.cuda, "OutOfMemoryError", None)) if t is not None)
    if isinstance(e, (MemoryError, *oom_types)):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower())


def describe_kind(kind: str | None) -> str:
    if kind is None:
        return "no facecond.kind metadata (not a facecond file: a model or file from elsewhere?)"
    name = KINDS.get(kind, (None,))[0]
    return f"facecond.kind={kind!r}" + (f" (a {name})" if name else "")


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    """An 8-byte little-endian header length that fits the file, then the JSON header's '{'."""
    n = int.from_bytes(head[:8], "little") if len(head) >= 9 else 0
    return 0 < n <= MAX_HEADER and 8 + n <= size and head[8:9] == b"{"


def _looks_like_pickle(head: bytes, size: int) -> str | None:
    if head[:4] == b"PK\x03\x04":
        return "a zip archive (torch.save writes these)"
    # A safetensors header length of e.g. 0x0380 bytes also starts with the bytes 80 03: that is no pickle.
    if _looks_like_safetensors(head, size):
        return None
    if len(head) >= 2 and head[0] == 0x80 and head[1] in PICKLE_PROTOCOLS:
        return f"a Python pickle (protocol {head[1]})"
    return None


def check_safetensors(path: str | os.PathLike, label: str = "facecond file", writer: str = "the facecond pack",
                      max_header: int = MAX_HEADER) -> dict:
    """The parsed JSON header of a well-formed safetensors file; ``PackFileError`` saying what is wrong otherwise.
    A header longer than ``max_header`` bytes is refused before it is read."""

    def fail(problem, what, **kw):
        return PackFileError(path, problem, what, label=label, writer=writer, **kw)

    if not os.path.exists(path):
        raise fail("missing", "no such file")
    if os.path.isdir(path):
        raise fail("not_safetensors", "is a folder, not a file")
    size = os.path.getsize(path)
    if size == 0:
        raise fail("empty", "the file is empty (0 bytes)")
    with open(path, "rb") as f:
        head = f.read(9)
        kind = _looks_like_pickle(head, size)
        if kind:
            raise fail("pickle", f"not a safetensors file but {kind}", expected="safetensors")
        if size < 8:
            raise fail("truncated", f"only {size} bytes: too short even for the 8-byte safetensors header length")
        n = int.from_bytes(head[:8], "little")
        if n == 0 or n > MAX_HEADER or head[8:9] != b"{":
            raise fail("not_safetensors", "not a safetensors file: its first bytes are not a safetensors header",
                       expected="an 8-byte header length then a JSON header", found=f"first bytes {head[:9]!r}")
        if 8 + n > size:
            raise fail("truncated", "the file ends inside its safetensors header",
                       expected=f"a header of {n} bytes", found=f"{size - 8} bytes after the length")
        if n > max_header:
            raise fail("too_large", f"its safetensors header (metadata included) is {n:,} bytes",
                       expected=f"at most {max_header:,} bytes", found=f"{n:,} bytes")
        f.seek(8)
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise fail("not_safetensors", f"not a safetensors file: the header is not JSON ({clip(e)})") from None
    if not isinstance(header, dict):
        raise fail("not_safetensors", "not a safetensors file: the header is not a JSON object")
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        raise fail("not_safetensors", "not a safetensors file: a tensor entry has no valid data_offsets") from None
    if 8 + n + end > size:
        raise fail("truncated", "the file ends inside its tensor data",
                   expected=f"{8 + n + end} bytes", found=f"{size} bytes")
    return header


def require_kind(path: str | os.PathLike, meta: dict[str, str] | None, kind: str, *, label: str | None = None,
                 writer: str | None = None) -> dict[str, str]:
    """``meta`` (a safetensors header's metadata; None counts as empty) if its ``facecond.kind`` is ``kind``;
    else a ``PackFileError`` ("wrong_kind") naming the file, the kind expected and the kind found. The one
    check of ``facecond.kind`` in the pack."""
    meta = meta or {}
    if meta.get("facecond.kind") != kind:
        label = label or KINDS.get(kind, ("facecond file",))[0]
        writer = writer or KINDS.get(kind, (None, "the facecond pack"))[1]
        raise PackFileError(path, "wrong_kind", f"not a {label}", expected=f"facecond.kind={kind!r}",
                            found=describe_kind(meta.get("facecond.kind")), label=label, writer=writer)
    return meta


def tensor_specs(path: str | os.PathLike, header: dict, label: str = "facecond file",
                 writer: str = "the facecond pack") -> dict[str, tuple[str, tuple[int, ...]]]:
    """{name: (dtype, shape)} from a safetensors header, every entry checked (at most ``MAX_TENSORS`` tensors of
    at most ``MAX_DIMS`` dimensions, known dtypes, data_offsets spanning exactly the shape's bytes) without
    reading or allocating any tensor."""
    def fail(what, problem="not_safetensors", **kw):
        return PackFileError(path, problem, what, label=label, writer=writer, **kw)

    names = [k for k in header if k != "__metadata__"]
    if len(names) > MAX_TENSORS:
        raise fail(f"it holds {len(names):,} tensors", "too_large", expected=f"at most {MAX_TENSORS}")
    specs = {}
    for k in names:
        v = header[k]
        dtype = v.get("dtype") if isinstance(v, dict) else None
        shape = v.get("shape") if isinstance(v, dict) else None
        offsets = v.get("data_offsets") if isinstance(v, dict) else None
        if dtype not in _ITEM_BYTES or not isinstance(shape, list) or len(shape) > MAX_DIMS \
                or not all(type(d) is int and d >= 0 for d in shape):
            raise fail(f"not a safetensors file: tensor {clip(repr(k), 80)} has an invalid entry "
                       f"{clip(json.dumps(v), 120)}")
        numel = 1
        for d in shape:
            numel *= d
        start, end = [*offsets, None, None][:2] if isinstance(offsets, list) else (None, None)
        if type(start) is not int or type(end) is not int or end - start != numel * _ITEM_BYTES[dtype]:
            raise fail(f"not a safetensors file: tensor {clip(repr(k), 80)}'s data_offsets do not match its "
                       f"shape {tuple(shape)} ({dtype})")
        specs[k] = (dtype, tuple(shape))
    return specs


def check_dtypes(path: str | os.PathLike, dtypes: dict[str, str], allowed: Mapping[str, tuple[str, ...]] | None = None,
                 *, label: str = "facecond file", writer: str = "the facecond pack") -> None:
    """``dtypes`` ({tensor: safetensors dtype name}) all float (``FLOAT_DTYPES``), or what ``allowed`` names
    for a tensor; else a "wrong_dtype" ``PackFileError`` naming the first tensor that is not."""
    allowed = allowed or {}
    for k, dt in dtypes.items():
        ok = allowed.get(k, FLOAT_DTYPES)
        if dt not in ok:
            raise PackFileError(path, "wrong_dtype", f"tensor {clip(repr(k), 80)} is stored as {dt}",
                                expected=" or ".join(ok), found=dt, label=label, writer=writer)


def torch_dtype_name(t) -> str:
    """A torch tensor's dtype as safetensors names it (``F32``, ``I8`` ...)."""
    import torch

    names = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}
    return names.get(t.dtype, str(t.dtype).removeprefix("torch."))


def check_finite(path: str | os.PathLike, tensors: dict, *, label: str = "facecond file",
                 writer: str = "the facecond pack") -> None:
    """Every floating-point tensor free of NaN/inf (checked in chunks of 16M values: no full-size copy); else a
    "non_finite" ``PackFileError`` naming the tensor and how many of its values are not finite."""
    import torch

    for k, t in tensors.items():
        if not t.is_floating_point() or t.device.type == "meta":
            continue
        flat = t.reshape(-1)
        bad = sum(int((~torch.isfinite(flat[i:i + (1 << 24)])).sum()) for i in range(0, flat.numel(), 1 << 24))
        if bad:
            raise PackFileError(path, "non_finite", f"tensor {clip(repr(k), 80)} has {bad:,} NaN/inf values of "
                                f"{flat.numel():,}", expected="finite numbers", found=f"{bad:,} NaN/inf",
                                label=label, writer=writer)


def read(path: str | os.PathLike, *, kind: str | None = None, label: str | None = None, writer: str | None = None,
         plan: Callable[[dict[str, str], dict[str, tuple[str, tuple[int, ...]]]], None] | None = None,
         dtypes: Mapping[str, tuple[str, ...]] | None = ALL_FLOAT, finite: bool = True
         ) -> tuple[dict[str, str], dict]:
    """(metadata, {name: tensor}) of a pack safetensors file, on the CPU.

    ``kind``: the ``facecond.kind`` the metadata must have; ``label`` and ``writer`` name the file's purpose and
    its writer in messages (taken from ``KINDS`` for a known kind). Before any tensor is read: the header (at most
    ``MAX_PACK_HEADER`` bytes), the kind, every tensor's dtype (float, or what ``dtypes`` allows for a tensor
    name; ``dtypes=None``: unchecked) and ``plan(metadata, {name: (dtype, shape)})``, which raises when the
    shapes or metadata numbers are not what the file's kind calls for. After: every float tensor finite
    (``finite=False``: files where NaN marks a missing row, the celebrity-face cache).
    """
    from safetensors import safe_open

    label = label or KINDS.get(kind, ("facecond file",))[0]
    writer = writer or KINDS.get(kind, (None, "the facecond pack"))[1]
    header = check_safetensors(path, label, writer, max_header=MAX_PACK_HEADER)
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise PackFileError(path, "not_safetensors", "not a safetensors file: its __metadata__ is not a map of "
                            "strings", label=label, writer=writer)
    specs = tensor_specs(path, header, label, writer)
    with open(path, "rb") as f:
        data = os.path.getsize(path) - 8 - int.from_bytes(f.read(8), "little")
    described = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if data != described:  # safetensors' rule: the data is exactly what the header describes
        raise PackFileError(path, "not_safetensors", "not a safetensors file: its header describes "
                            f"{described:,} bytes of tensor data but {data:,} follow", label=label, writer=writer)
    if kind is not None:
        require_kind(path, meta, kind, label=label, writer=writer)
    if dtypes is not None:
        check_dtypes(path, {k: dt for k, (dt, _) in specs.items()}, dtypes, label=label, writer=writer)
    if plan is not None:
        plan(meta, specs)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # whatever safetensors still finds wrong (overlapping offsets, ...)
        if out_of_memory(e):
            raise
        raise PackFileError(path, "not_safetensors", f"unreadable safetensors file ({type(e).__name__}: {clip(e)})",
                            label=label, writer=writer) from None
    if finite:
        check_finite(path, tensors, label=label, writer=writer)
    return meta, tensors


def shape_error(path: str | os.PathLike, expected, found, *, kind: str | None = None, label: str | None = None,
                writer: str | None = None, what: str | None = None) -> PackFileError:
    """The error for tensors whose names or shapes are not what the file's kind (and metadata) call for."""
    label = label or KINDS.get(kind, ("facecond file",))[0]
    writer = writer or KINDS.get(kind, (None, "the facecond pack"))[1]
    return PackFileError(path, "wrong_shape", what or f"the tensors do not have the shapes of a {label}",
                         expected=str(expected), found=str(found), label=label, writer=writer)


def metadata_error(path: str | os.PathLike, detail: str, *, kind: str | None = None, label: str | None = None,
                   writer: str | None = None, found: str | None = None) -> PackFileError:
    label = label or KINDS.get(kind, ("facecond file",))[0]
    writer = writer or KINDS.get(kind, (None, "the facecond pack"))[1]
    return PackFileError(path, "bad_metadata", f"malformed {label} metadata ({clip(detail)})", found=found,
                         label=label, writer=writer)


def check_torch_file(path: str | os.PathLike, label: str = "weights file", writer: str = "its publisher") -> None:
    """Before ``torch.load(weights_only=True)``: missing, empty, truncated zip, or not a torch file at all."""

    def fail(problem, what, **kw):
        return PackFileError(path, problem, what, label=label, writer=writer, **kw)

    if not os.path.isfile(path):
        raise fail("missing", "no such file")
    size = os.path.getsize(path)
    if size == 0:
        raise fail("empty", "the file is empty (0 bytes)")
    with open(path, "rb") as f:
        head = f.read(2)
    if head[:2] == b"PK":
        if not zipfile.is_zipfile(path):
            raise fail("truncated", "a torch zip archive whose end is missing")
        return
    if not (len(head) == 2 and head[0] == 0x80 and head[1] in PICKLE_PROTOCOLS):
        raise fail("not_safetensors", "neither a torch file (zip or pickle) nor a safetensors file",
                   found=f"first bytes {head!r}")
