"""ComfyUI glue for the pack's weights: model folders in ``folder_paths`` and manifest-checked file lookup.

``register_model_folders()`` runs at pack import (nodes/__init__.py). It only adds entries: folders a user
set in extra_model_paths.yaml (or another pack registered) stay first and are searched before ours.
"""

from __future__ import annotations

import logging
import os

import folder_paths

from ..py.weights import fetch
from ..py.weights import manifest as weights

log = logging.getLogger("facecond")

_PT = {".safetensors", ".pt", ".pth", ".bin"}

# folder_paths name -> (sub-directory of ComfyUI's models dir, file extensions listed in the UI)
MODEL_FOLDERS: dict[str, tuple[str, set[str]]] = {
    "facenet": ("facenet", {".pt", ".pth", ".safetensors"}),
    "insightface": ("insightface", {".onnx"}),
    "facecond_face0": ("facecond/face0", _PT),
    "facecond_celebbasis": ("facecond/celebbasis", _PT),
    "facecond_names": ("facecond/names", {".txt"}),  # celebrity-name lists (Celeb Basis, face TI), one name a line
    "facecond_aggregators": ("facecond/aggregators", _PT),
    "facecond_embeds": ("facecond/embeds", {".safetensors"}),  # saved identities
    "facecond_clip_score": ("facecond/clip_score", set()),  # CLIP models (transformers folders) for CLIPScore
}


def register_model_folders() -> None:
    """Register the pack's model folders under ComfyUI's models dir; idempotent, never replaces entries."""
    for name, (sub, exts) in MODEL_FOLDERS.items():
        default = os.path.join(folder_paths.models_dir, *sub.split("/"))
        if name not in folder_paths.folder_names_and_paths:
            folder_paths.folder_names_and_paths[name] = ([default], set(exts))
            continue
        folder_paths.add_model_folder_path(name, default)  # appended: user-configured paths stay first
        paths, old_exts = folder_paths.folder_names_and_paths[name]
        # an empty set (from add_model_folder_path / extra_model_paths.yaml) means "no filter": give it ours
        folder_paths.folder_names_and_paths[name] = (paths, set(old_exts) | exts)


def resolve_weight(weight_id: str, *, allow_download: bool | None = None, node: str = "facecond") -> str:
    """Path of a manifest weight (a file, or the unpacked directory of a zip pack), verified.

    Looks in every registered path of the entry's folder; if absent and downloads are allowed (argument and
    ``FACECOND_OFFLINE``), downloads into the first path with a ComfyUI progress bar; else raises a
    ``weights.WeightsError`` naming the node, the file, the folder and the URL.
    """
    entry = weights.get_entry(weight_id)
    folders = folder_paths.get_folder_paths(entry.folder) if entry.folder in folder_paths.folder_names_and_paths \
        else []
    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        import comfy.utils

        if bar is None:
            bar = comfy.utils.ProgressBar(max(total, 1))
        bar.update_absolute(done, total or None)

    return str(fetch.ensure_weight(entry, folders, allow_download=allow_download, progress=progress, node=node))


def verify_user_file(folder: str, filename: str) -> str:
    """Full path of a file the user picked in ``folder``; checked against the manifest when its name is known.

    Unknown files (the user's own) pass through unverified. A known file with the wrong size or sha256
    raises ``weights.WeightsError`` naming the path, the expected and actual hash, and the download URL.
    """
    path = folder_paths.get_full_path_or_raise(folder, filename)
    pins = weights.pins_for(folder, filename)
    if pins is None:
        log.debug("[facecond] %s is not in the weights manifest; using it unverified", path)
    else:
        entry, sha256, size = pins
        weights.verify_file(path, sha256, size, url=entry.url, label=entry.id)
    return path
