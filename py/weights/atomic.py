"""Every file the pack writes goes through here: atomic writes, and pairs of files that change together.

``write_bytes(path, data)`` / ``write_text`` / ``save_file(tensors, path, metadata)``
    Written to a temporary file in the same folder (``.<name>.<random>.tmp``: a name no ComfyUI file list
    shows), flushed and fsynced, then ``os.replace``-d over ``path`` and the folder fsynced where the system
    allows it. A kill at any moment leaves the old complete file or the new complete file, never a truncated
    one, whatever the safetensors version (0.4.x's ``save_file`` truncates the old file in place; 0.8 renames):
    the tensors are serialised in memory by ``safetensors.torch.save`` and written by us.

``commit_pair(files, stamp)`` / ``recover_pair(paths)`` / ``pair_stamp(path)``
    Several safetensors files that only make sense together (a trained MLP and its trainer state, a face-TI
    embedding and its state). Each carries the same ``facecond_pair`` stamp in its metadata (run id + step).
    ``commit_pair`` writes every file to ``<path>.partial`` (fsynced) first, then renames them in order: a
    kill before the first rename leaves the old pair, a kill between renames leaves the new partials that
    ``recover_pair`` finishes (roll forward) the next time the pair is read. ``recover_pair`` then says
    whether the pair is consistent; a mismatched pair is refused by the caller, never silently resumed.

``free_name(name, paths_of, overwrite)``
    The no-silent-overwrite rule of the pack's writing nodes: ``name`` itself when ``overwrite`` or when none of
    its files ``paths_of(name)`` exists, else the first free ``name_00001``, ``name_00002`` ... (as SaveImage
    numbers its files).
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import tempfile
from collections.abc import Callable, Sequence

import torch

PAIR_KEY = "facecond_pair"
PARTIAL = ".partial"


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder or ".", os.O_RDONLY)
    except OSError:  # Windows: folders cannot be opened; os.replace is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_synced(path: str, data: bytes) -> None:
    """``data`` into a fresh temp file beside ``path``, fsynced, renamed to ``path`` (no folder fsync)."""
    folder, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Atomically replace ``path`` with ``data`` (see the module docstring)."""
    path = os.fspath(path)
    _write_synced(path, data)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)


def save_file(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None):
    """``safetensors.torch.save_file``, atomic (the drop-in every save of the pack uses)."""
    write_bytes(path, safetensors_bytes(tensors, metadata))


# --- pairs ---------------------------------------------------------------------------------------------------
def header_metadata(path: str | os.PathLike) -> dict | None:
    """The ``__metadata__`` of a safetensors file read from its header alone; None if the file is missing,
    short or not safetensors (a partial write)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                return None
            (n,) = struct.unpack("<Q", head)
            size = os.fstat(f.fileno()).st_size
            if n > size - 8 or n > 100_000_000:
                return None
            header = json.loads(f.read(n))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        if 8 + n + max(ends, default=0) != size:
            return None  # truncated
        return header.get("__metadata__") or {}
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


def pair_stamp(path: str | os.PathLike) -> str | None:
    meta = header_metadata(path)
    return None if meta is None else meta.get(PAIR_KEY)


def make_stamp(run: str, step: int) -> str:
    return json.dumps({"run": run, "step": int(step)}, sort_keys=True)


def commit_pair(files: Sequence[tuple[str, dict[str, torch.Tensor], dict[str, str]]], stamp: str) -> None:
    """Write ``files`` ((path, tensors, metadata), ...) as one pair stamped ``stamp`` (see the module docstring).
    The last file in ``files`` is renamed last."""
    blobs = [(os.fspath(p), safetensors_bytes(t, {**m, PAIR_KEY: stamp})) for p, t, m in files]
    for path, data in blobs:
        _write_synced(path + PARTIAL, data)
    for path, _ in blobs:
        _fsync_dir(os.path.dirname(os.path.abspath(path)))
    for path, _ in blobs:
        os.replace(path + PARTIAL, path)
    for path, _ in blobs:
        _fsync_dir(os.path.dirname(os.path.abspath(path)))


def recover_pair(paths: Sequence[str]) -> str:
    """Finish or drop an interrupted ``commit_pair`` of ``paths``, then: "absent" (no file of the pair),
    "ok" (every file there with one stamp) or "mismatch" (a file missing or stamps differ)."""
    paths = [os.fspath(p) for p in paths]
    partial = {p: pair_stamp(p + PARTIAL) for p in paths if os.path.exists(p + PARTIAL)}
    if partial:
        # the renames start only once every partial is complete: roll forward if the partials left, with the
        # files already renamed, make one stamp; otherwise the kill came while writing them: drop them.
        effective = {p: partial.get(p, pair_stamp(p)) for p in paths}
        stamps = set(effective.values())
        if None not in partial.values() and len(stamps) == 1 and None not in stamps:
            for p in partial:
                os.replace(p + PARTIAL, p)
        else:
            for p in partial:
                with contextlib.suppress(OSError):
                    os.remove(p + PARTIAL)
    there = [p for p in paths if os.path.exists(p)]
    if not there:
        return "absent"
    stamps = {pair_stamp(p) for p in paths}
    return "ok" if len(there) == len(paths) and len(stamps) == 1 and None not in stamps else "mismatch"


def free_name(name: str, paths_of: Callable[[str], Sequence[str]], overwrite: bool = False) -> str:
    """``name`` if ``overwrite`` or none of the files ``paths_of(name)`` exists, else the first ``name_NNNNN``
    (``name_00001``, ``name_00002`` ... as SaveImage numbers) whose files are all free."""
    def taken(n: str) -> bool:
        return any(os.path.exists(p) or os.path.exists(p + PARTIAL) for p in paths_of(n))

    if overwrite or not taken(name):
        return name
    i = 1
    while taken(f"{name}_{i:05d}"):
        i += 1
    return f"{name}_{i:05d}"
