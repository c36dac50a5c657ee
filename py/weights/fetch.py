"""Getting a weight onto disk safely: atomic downloads and safe zip unpacking, checked against the manifest.

``ensure_weight`` is the whole flow for one manifest entry: find it in the given folders and verify it, else
download it (stdlib urllib only) into the first folder through a temp file, verify size + sha256 and
``os.replace`` it into place, else raise an error that says which file to put into which folder and where to
download it. ``FACECOND_OFFLINE=1`` forbids downloads. Nothing here imports ComfyUI.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
import tempfile
import urllib.request
import zipfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from .manifest import (
    _CHUNK,
    _HASH_CACHE,
    PackFile,
    Progress,
    WeightEntry,
    WeightsError,
    downloads_allowed,
    file_identity,
    find_existing,
    missing_message,
    verify_entry,
    verify_file,
)

log = logging.getLogger("facecond")

DEFAULT_TIMEOUT = 60.0  # seconds without any byte from the server before a download is abandoned


def download_file(url: str, dest: str | os.PathLike, *, sha256: str | None = None, size: int | None = None,
                  progress: Progress | None = None, timeout: float = DEFAULT_TIMEOUT) -> Path:
    """Stream ``url`` to a temp file next to ``dest``, check length/size/sha256, then atomically move it."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        h, done = hashlib.sha256(), 0
        req = urllib.request.Request(url, headers={"User-Agent": "facecond-weights"})
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(req, timeout=timeout) as resp:
            length = int(resp.headers.get("Content-Length") or 0)
            total = length or size or 0
            while chunk := resp.read(_CHUNK):
                out.write(chunk)
                h.update(chunk)
                done += len(chunk)
                if size is not None and done > size:
                    raise WeightsError(f"server sent more than the expected {size} bytes")
                if progress is not None:
                    progress(done, total)
        if length and done != length:
            raise WeightsError(f"truncated download: got {done} of {length} bytes")
        if size is not None and done != size:
            raise WeightsError(f"wrong size: got {done} bytes, expected {size}")
        actual = h.hexdigest()
        if sha256 is not None and actual != sha256:
            raise WeightsError(f"sha256 mismatch: expected {sha256}, got {actual}")
        os.replace(tmp, dest)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, Exception):
            raise WeightsError(f"downloading {url} to {dest} failed: {e}; nothing was kept. "
                               f"Put {dest.name} into {dest.parent} yourself (download it from {url}), "
                               f"expected sha256 {sha256}.") from e
        raise
    _HASH_CACHE[file_identity(dest)] = actual
    return dest


def _safe_member_name(name: str, strip_prefix: str) -> str | None:
    """The member's path relative to the pack dir, None for directories; raise on unsafe paths."""
    norm = name.replace("\\", "/")
    parts = PurePosixPath(norm).parts
    if norm.startswith("/") or (parts and ":" in parts[0]) or ".." in parts:
        raise WeightsError(f"refusing unsafe path {name!r} in zip archive")
    if strip_prefix and norm.startswith(strip_prefix):
        norm = norm[len(strip_prefix):]
    return None if not norm or norm.endswith("/") else norm


def extract_zip(zip_path: str | os.PathLike, dest_dir: str | os.PathLike, *, strip_prefix: str = "",
                files: Sequence[PackFile] = ()) -> Path:
    """Unpack a zip safely (no absolute paths, ``..`` or links) into ``dest_dir`` via a temp dir + rename.

    Every member is checked before anything is written; ``files`` (if given) are verified before the move.
    """
    dest_dir = Path(dest_dir)
    dest_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest_dir.name}.", suffix=".unpacking", dir=dest_dir.parent))
    try:
        with zipfile.ZipFile(zip_path) as zf:
            plan = []
            for info in zf.infolist():
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise WeightsError(f"refusing symbolic link {info.filename!r} in zip archive")
                if (rel := _safe_member_name(info.filename, strip_prefix)) is not None:
                    plan.append((info, rel))
            for info, rel in plan:
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, _CHUNK)
        for f in files:
            if not (tmp / f.name).is_file():
                raise WeightsError(f"zip archive {zip_path} has no {strip_prefix}{f.name}")
            verify_file(tmp / f.name, f.sha256, f.size)
        for src in sorted(p for p in tmp.rglob("*") if p.is_file()):  # all verified: move (each move is atomic)
            (dest_dir / src.relative_to(tmp)).parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dest_dir / src.relative_to(tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest_dir


def ensure_weight(entry: WeightEntry, folders: Sequence[str | os.PathLike], *, allow_download: bool | None = None,
                  progress: Progress | None = None, node: str = "facecond",
                  timeout: float = DEFAULT_TIMEOUT) -> Path:
    """Find + verify the entry's file in ``folders`` (first wins), else download it into ``folders[0]``."""
    if (found := find_existing(entry, folders)) is not None:
        return verify_entry(entry, found)
    if not entry.url or not folders or not downloads_allowed(allow_download):
        raise WeightsError(missing_message(entry, folders, node))
    folder = Path(folders[0])
    log.info("[facecond] downloading %s (%s) from %s into %s", entry.id, entry.license, entry.url, folder)
    path = download_file(entry.url, folder / entry.filename, sha256=entry.sha256, size=entry.size,
                         progress=progress, timeout=timeout)
    if entry.kind != "zip":
        verify_entry(entry, path)  # warns once when no hash is pinned
        return path
    try:
        return extract_zip(path, entry.where(folder), strip_prefix=entry.strip_prefix, files=entry.files)
    except (WeightsError, zipfile.BadZipFile, OSError) as e:
        raise WeightsError(f"unpacking {path} failed: {e}; nothing was kept. "
                           f"{missing_message(entry, folders, node)}") from e
    finally:
        path.unlink(missing_ok=True)  # the archive is not needed once its files are verified in place
