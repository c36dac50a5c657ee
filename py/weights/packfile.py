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
- the wrong kind of file (``facecond.kind`` metadata) or tensors of the wrong shape (``shape_error``).

Safetensors layout: 8 bytes little-endian header length N, N bytes of JSON header
(``{name: {dtype, shape, data_offsets: [start, end]}, "__metadata__": {...}}``), then the tensor data.
"""

from __future__ import annotations

import json
import os
import zipfile

MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header
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
}


class PackFileError(ValueError):
    """A pack file that cannot be used. ``problem`` is a key of ``FIXES``; the message is complete by itself."""

    def __init__(self, path: str | os.PathLike, problem: str, what: str, *, expected: str | None = None,
                 found: str | None = None, label: str = "facecond file", writer: str = "the facecond pack"):
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


def check_safetensors(path: str | os.PathLike, label: str = "facecond file", writer: str = "the facecond pack"
                      ) -> dict:
    """The parsed JSON header of a well-formed safetensors file; ``PackFileError`` saying what is wrong otherwise."""

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
        f.seek(8)
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, ValueError) as e:
            raise fail("not_safetensors", f"not a safetensors file: the header is not JSON ({e})") from None
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


def read(path: str | os.PathLike, *, kind: str | None = None, label: str | None = None, writer: str | None = None
         ) -> tuple[dict[str, str], dict]:
    """(metadata, {name: tensor}) of a pack safetensors file, on the CPU.

    ``kind``: the ``facecond.kind`` the metadata must have (checked before any tensor is read); ``label`` and
    ``writer`` name the file's purpose and its writer in messages (taken from ``KINDS`` for a known kind).
    """
    from safetensors import safe_open

    label = label or KINDS.get(kind, ("facecond file",))[0]
    writer = writer or KINDS.get(kind, (None, "the facecond pack"))[1]
    check_safetensors(path, label, writer)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if kind is not None:
                require_kind(path, meta, kind, label=label, writer=writer)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except PackFileError:
        raise
    except Exception as e:  # whatever safetensors still finds wrong (dtype, overlapping offsets, ...)
        if out_of_memory(e):
            raise
        raise PackFileError(path, "not_safetensors", f"unreadable safetensors file ({type(e).__name__}: {e})",
                            label=label, writer=writer) from None
    return meta, tensors


def shape_error(path: str | os.PathLike, expected, found, *, kind: str | None = None, label: str | None = None,
                writer: str | None = None, what: str | None = None) -> PackFileError:
    """The error for tensors whose names or shapes are not what the file's kind (and metadata) call for."""
    label = label or KINDS.get(kind, ("facecond file",))[0]
    writer = writer or KINDS.get(kind, (None, "the facecond pack"))[1]
    return PackFileError(path, "wrong_shape", what or f"the tensors do not have the shapes of a {label}",
                         expected=str(expected), found=str(found), label=label, writer=writer)


def metadata_error(path: str | os.PathLike, detail: str, *, kind: str | None = None) -> PackFileError:
    label, writer = KINDS.get(kind, ("facecond file", "the facecond pack"))
    return PackFileError(path, "bad_metadata", f"malformed {label} metadata ({detail})", label=label, writer=writer)


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
