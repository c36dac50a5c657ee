"""Trusted weights: the manifest (weights_manifest.json), sha256 checks and safe loading.

Finding, downloading and unpacking a manifest entry is ``fetch.ensure_weight``. Entries whose sha256 is null
(not published yet) are used unverified, with a logged warning. Nothing here imports ComfyUI.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

log = logging.getLogger("facecond")

MANIFEST_PATH = Path(__file__).resolve().parents[2] / "weights_manifest.json"
OFFLINE_ENV = "FACECOND_OFFLINE"
_CHUNK = 1 << 20
_KINDS = ("file", "zip", "package")
_HASH_CACHE: dict[tuple[str, int, int], str] = {}  # (realpath, size, mtime_ns) -> sha256
_WARNED_UNVERIFIED: set[str] = set()

Progress = Callable[[int, int], None]  # (done_bytes, total_bytes); total 0 when unknown


class WeightsError(RuntimeError):
    """A weight file is missing, corrupt or could not be downloaded; the message says what to do."""


class ManifestError(WeightsError, ValueError):
    """weights_manifest.json (or a given manifest) is malformed."""


@dataclass(frozen=True)
class PackFile:
    name: str
    sha256: str | None
    size: int | None


@dataclass(frozen=True)
class WeightEntry:
    id: str
    name: str
    kind: str  # "file" | "zip" | "package"
    filename: str  # the file to put into the folder (for "zip": the archive to download)
    url: str | None
    sha256: str | None
    size: int | None
    license: str
    folder: str  # ComfyUI model folder name (folder_paths key)
    nodes: tuple[str, ...]
    description: str
    package: str | None = None  # "package": importable module that ships the file ...
    package_path: str | None = None  # ... at this path inside it
    strip_prefix: str = ""  # "zip": leading directory inside the archive to drop
    files: tuple[PackFile, ...] = ()  # "zip": the files the pack unpacks to

    @property
    def pack_dir(self) -> str:
        """For a zip pack: where it unpacks, relative to the folder (insightface layout models/<pack>)."""
        return f"models/{self.filename.removesuffix('.zip')}"

    def where(self, folder: str | os.PathLike) -> Path:
        return Path(folder) / (self.pack_dir if self.kind == "zip" else self.filename)


def _pins(raw: dict, what: str) -> tuple[str | None, int | None]:
    """(sha256, size) of a manifest object, each validated or None."""
    digest, size = raw.get("sha256"), raw.get("size")
    if digest is not None and not (isinstance(digest, str) and len(digest) == 64
                                   and all(c in "0123456789abcdef" for c in digest)):
        raise ManifestError(f"{what}: sha256 must be 64 lowercase hex characters or null, got {digest!r}")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
        raise ManifestError(f"{what}: size must be a positive integer (bytes) or null, got {size!r}")
    return digest, size


def parse_manifest(data: dict) -> dict[str, WeightEntry]:
    """Validate a decoded manifest; raise ManifestError naming the entry and field that is wrong."""
    if not isinstance(data, dict) or not isinstance(data.get("weights"), dict):
        raise ManifestError("weights manifest: expected an object with a 'weights' object")
    entries = {}
    for wid, raw in data["weights"].items():
        what = f"weights manifest entry '{wid}'"
        if not isinstance(raw, dict):
            raise ManifestError(f"{what}: expected an object, got {type(raw).__name__}")
        for key in ("name", "kind", "filename", "license", "folder", "description"):
            if not isinstance(raw.get(key), str) or not raw[key]:
                raise ManifestError(f"{what}: field '{key}' must be a non-empty string")
        kind, filename = raw["kind"], raw["filename"]
        if kind not in _KINDS:
            raise ManifestError(f"{what}: kind must be one of {_KINDS}, got {kind!r}")
        if "/" in filename or "\\" in filename or filename.startswith("."):
            raise ManifestError(f"{what}: filename must be a plain file name, got {filename!r}")
        url = raw.get("url")
        if url is not None and not (isinstance(url, str) and url.startswith(("https://", "http://"))):
            raise ManifestError(f"{what}: url must be an http(s) URL or null, got {url!r}")
        nodes = raw.get("nodes")
        if not isinstance(nodes, list) or not all(isinstance(n, str) for n in nodes):
            raise ManifestError(f"{what}: 'nodes' must be a list of node ids")
        files = []
        for fname, f in (raw.get("files") or {}).items():
            if not isinstance(f, dict) or "/" in fname or fname.startswith("."):
                raise ManifestError(f"{what}: 'files' must map plain file names to {{sha256, size}} ({fname!r})")
            files.append(PackFile(fname, *_pins(f, f"{what} file {fname}")))
        if kind == "zip" and not files:
            raise ManifestError(f"{what}: a zip pack needs a 'files' object (name -> sha256, size)")
        if kind == "package" and not (raw.get("package") and raw.get("package_path")):
            raise ManifestError(f"{what}: a package weight needs 'package' and 'package_path'")
        digest, size = _pins(raw, what)
        entries[wid] = WeightEntry(
            id=wid, name=raw["name"], kind=kind, filename=filename, url=url, sha256=digest, size=size,
            license=raw["license"], folder=raw["folder"], nodes=tuple(nodes), description=raw["description"],
            package=raw.get("package"), package_path=raw.get("package_path"),
            strip_prefix=raw.get("strip_prefix") or "", files=tuple(files))
    return entries


@lru_cache(maxsize=8)
def load_manifest(path: str | os.PathLike = MANIFEST_PATH) -> dict[str, WeightEntry]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ManifestError(f"cannot read weights manifest {path}: {e}") from e
    return parse_manifest(data)


def get_entry(weight_id: str, manifest: dict[str, WeightEntry] | None = None) -> WeightEntry:
    manifest = load_manifest() if manifest is None else manifest
    if weight_id not in manifest:
        raise WeightsError(f"unknown weight id {weight_id!r}; known: {', '.join(sorted(manifest))}")
    return manifest[weight_id]


def pins_for(folder: str, filename: str, manifest=None) -> tuple[WeightEntry, str | None, int | None] | None:
    """(entry, sha256, size) for a file a user picked in ``folder`` (a name relative to it), or None if unknown.

    Matches a single-file entry by file name, and a zip pack's file by its unpacked path (models/<pack>/<file>).
    """
    manifest = load_manifest() if manifest is None else manifest
    rel = filename.replace("\\", "/")
    for e in manifest.values():
        if e.folder != folder:
            continue
        if e.kind != "zip" and Path(rel).name == e.filename:
            return e, e.sha256, e.size
        if e.kind == "zip":
            for f in e.files:
                if rel == f"{e.pack_dir}/{f.name}":
                    return e, f.sha256, f.size
    return None


def file_identity(path: str | os.PathLike) -> tuple[str, int, int]:
    """(realpath, size, mtime_ns): the one key of every per-file cache of the pack (hashes, ONNX kinds, models).
    A replaced or rewritten file gets a new key, so it is read anew; two names for one file share a key."""
    real = os.path.realpath(path)
    st = os.stat(real)
    return real, st.st_size, st.st_mtime_ns


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a file, read in chunks; cached by (realpath, size, mtime_ns) so re-verifying is free."""
    key = file_identity(path)
    if key not in _HASH_CACHE:
        h = hashlib.sha256()
        with open(key[0], "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        _HASH_CACHE[key] = h.hexdigest()
    return _HASH_CACHE[key]


def verify_file(path: str | os.PathLike, sha256: str | None, size: int | None = None, *, url: str | None = None,
                label: str = "") -> bool:
    """Check a file's size and sha256. True: verified; False: no hash pinned (warned once). Raises on mismatch."""
    path = Path(path)
    fix = f"Delete it and download it again from {url}." if url else "Delete it and replace it with the right file."
    if size is not None and (actual_size := path.stat().st_size) != size:
        raise WeightsError(f"{path}: wrong size {actual_size} bytes, expected {size} (sha256 {sha256}). "
                           f"The file is truncated or a different version. {fix}")
    if sha256 is None:
        if str(path) not in _WARNED_UNVERIFIED:
            _WARNED_UNVERIFIED.add(str(path))
            log.warning("[facecond] %s%s has no pinned sha256 in the weights manifest: using it unverified",
                        path, f" ({label})" if label else "")
        return False
    actual = sha256_file(path)
    if actual != sha256:
        raise WeightsError(f"{path}: sha256 mismatch: expected {sha256}, got {actual}. "
                           f"The file is corrupt or a different version. {fix}")
    return True


def verify_entry(entry: WeightEntry, path: str | os.PathLike) -> Path:
    """Verify a file (or an unpacked zip pack directory) against its entry; return the path."""
    path = Path(path)
    if entry.kind == "zip":
        for f in entry.files:
            verify_file(path / f.name, f.sha256, f.size, url=entry.url, label=entry.id)
    else:
        verify_file(path, entry.sha256, entry.size, url=entry.url, label=entry.id)
    return path


def downloads_allowed(allow_download: bool | None = None) -> bool:
    """False when the caller says so or FACECOND_OFFLINE is set (the env var always wins)."""
    offline = os.environ.get(OFFLINE_ENV, "").strip().lower() not in ("", "0", "false", "no")
    return not offline and allow_download is not False


def missing_message(entry: WeightEntry, folders: Sequence[str | os.PathLike], node: str = "facecond") -> str:
    folder = str(folders[0]) if folders else f"the ComfyUI '{entry.folder}' model folder"
    also = f" (searched: {', '.join(map(str, folders))})" if len(folders) > 1 else ""
    if entry.kind == "zip":
        files = ", ".join(f.name for f in entry.files)
        put = (f"download {entry.url} and unzip it so that {Path(folder) / entry.pack_dir} holds {files}"
               f"{' (without the ' + entry.strip_prefix + ' folder inside the zip)' if entry.strip_prefix else ''}")
    elif entry.kind == "package":
        put = (f"reinstall the {entry.package} package (pip install facenet-pytorch==2.5.3 --no-deps), "
               f"or put {entry.filename} into {folder} (download it from {entry.url})")
    elif entry.url:
        put = f"put {entry.filename} into {folder} (download it from {entry.url})"
    else:
        put = f"put {entry.filename} into {folder} (not published yet: use a file you trained)"
    return f"{node}: weight '{entry.id}' ({entry.name}) is missing{also}. To fix, {put}."


def package_file(entry: WeightEntry) -> Path | None:
    """Where a weight that ships inside a pip package is, or None if the package is not installed."""
    spec = importlib.util.find_spec(entry.package) if entry.package else None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / entry.package_path
    return path if path.is_file() else None


def find_existing(entry: WeightEntry, folders: Sequence[str | os.PathLike]) -> Path | None:
    if entry.kind == "package" and (p := package_file(entry)) is not None:
        return p
    for folder in folders:
        p = entry.where(folder)
        if (entry.kind == "zip" and all((p / f.name).is_file() for f in entry.files)) or p.is_file():
            return p
    return None


def load_state_dict(path: str | os.PathLike, label: str = "weights file", writer: str = "its publisher", *,
                    dtypes=None, plan=None) -> dict:
    """A flat ``{name: tensor}`` dict from .safetensors or a torch file, never unpickling arbitrary objects.

    Nested dicts of tensors (IP-Adapter's ``.bin``: ``{"image_proj": {...}, "ip_adapter": {...}}``) are
    flattened to dotted keys; a ``{"state_dict": {...}}`` wrapper is unwrapped. A missing, empty, truncated or
    non-weights file raises ``packfile.PackFileError`` (``label``/``writer`` name it in the fix); a torch file
    holding anything but tensors raises ``WeightsError``. Tensors with NaN/inf are refused (``PackFileError``);
    ``dtypes`` (``packfile.read``'s: ``ALL_FLOAT`` = float16/bfloat16/float32 only; None: any) and ``plan``
    (called with {} and ``{name: (dtype, shape)}`` before tensor data is used) are checked for both formats.
    """
    import torch

    from . import packfile

    path = Path(path)
    if path.suffix == ".safetensors":
        return packfile.read(path, label=label, writer=writer, dtypes=dtypes, plan=plan)[1]
    packfile.check_torch_file(path, label, writer)
    try:
        try:  # memory-mapped: the checks below read shapes without loading the data (zip format only)
            sd, mapped = torch.load(path, map_location="cpu", weights_only=True, mmap=True), True
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            sd, mapped = torch.load(path, map_location="cpu", weights_only=True), False  # legacy (pre-1.6) format
    except Exception as e:  # UnpicklingError for any non-allow-listed global
        if packfile.out_of_memory(e):
            raise
        raise WeightsError(f"{path}: refusing to load: it is not a plain tensor state dict ({e}). "
                           f"Use a .safetensors file or a state dict saved with torch.save(model.state_dict())."
                           ) from e
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):  # training checkpoints nest it
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise WeightsError(f"{path}: expected a state dict (name -> tensor), got {type(sd).__name__}")
    flat: dict[str, torch.Tensor] = {}
    bad: list[str] = []

    def walk(d: dict, prefix: str) -> None:  # nested dicts (e.g. IP-Adapter .bin) become dotted keys
        for k, v in d.items():
            if isinstance(v, dict) and isinstance(k, str):
                walk(v, f"{prefix}{k}.")
            elif isinstance(k, str) and isinstance(v, torch.Tensor):
                flat[prefix + k] = v
            else:
                bad.append(f"{prefix}{k}")

    walk(sd, "")
    if bad:
        raise WeightsError(f"{path}: not a plain state dict; non-tensor entries: {packfile.clip(bad[:5])}")
    if len(flat) > packfile.MAX_TENSORS:
        raise packfile.PackFileError(path, "too_large", f"it holds {len(flat):,} tensors",
                                     expected=f"at most {packfile.MAX_TENSORS}", label=label, writer=writer)
    specs = {k: (packfile.torch_dtype_name(v), tuple(v.shape)) for k, v in flat.items()}
    if dtypes is not None:
        packfile.check_dtypes(path, {k: dt for k, (dt, _) in specs.items()}, dtypes, label=label, writer=writer)
    if plan is not None:
        plan({}, specs)
    if mapped:  # checked: now read into memory (no open mapping of the user's file is kept)
        flat = {k: v.clone() for k, v in flat.items()}
    packfile.check_finite(path, flat, label=label, writer=writer)
    return flat
