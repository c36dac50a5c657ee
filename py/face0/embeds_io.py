"""Face embeddings as files: an identity built once (averaged, edited, or a random character) is saved,
reused in any workflow and shared.

Format (safetensors): tensor ``embeds`` (N, D) float32; metadata (strings): ``facecond.kind = "face_embeds"``,
``format_version``, ``model`` (embedder id, ``FaceEmbeds.model``), ``normalized`` (``true``/``false``),
``dim`` (D), ``count`` (N), ``source`` (free text: where it came from), ``source_index`` (JSON list).
"""

from __future__ import annotations

import json
import os

import torch

from ..faces.types import FaceEmbeds
from ..weights import packfile, packmeta
from ..weights.atomic import save_file

KIND = "face_embeds"
FORMAT_VERSION = "1"


def save_embeds(embeds: FaceEmbeds, path: str | os.PathLike, source: str = "") -> None:
    if len(embeds) == 0:
        raise ValueError("save_embeds: nothing to save (0 embeddings)")
    meta = {"facecond.kind": KIND, "format_version": FORMAT_VERSION, "model": embeds.model,
            "normalized": "true" if embeds.normalized else "false", "dim": str(embeds.dim),
            "count": str(len(embeds)), "source": source, "source_index": json.dumps(list(embeds.source_index))}
    save_file({"embeds": embeds.embeds.detach().to("cpu", torch.float32).contiguous()}, str(path), metadata=meta)


MAX_COUNT, MAX_DIM = 100_000, 8192  # bounds on an embeddings file (README "Limits")


def load_embeds(path: str | os.PathLike) -> tuple[FaceEmbeds, dict[str, str]]:
    """The FaceEmbeds stored in ``path`` and the file's metadata (for ``source``). The shape is checked from the
    header (``embeds`` (N, D), 1 <= N <= ``MAX_COUNT``, 1 <= D <= ``MAX_DIM``, D as its metadata says) before the
    data is read; float weights only, all finite. An unreadable or wrong file raises ``packfile.PackFileError``
    (a ValueError) naming the path, the problem and the fix."""
    def plan(meta, specs):
        shapes = {k: shape for k, (_, shape) in specs.items()}
        shape = shapes.get("embeds")
        if shape is None or len(shape) != 2 or not (1 <= shape[0] <= MAX_COUNT and 1 <= shape[1] <= MAX_DIM):
            raise packfile.shape_error(path, f"'embeds': a non-empty (N, D) tensor, N <= {MAX_COUNT:,}, "
                                       f"D <= {MAX_DIM}", shapes, kind=KIND)
        if "dim" in meta and meta["dim"] != str(shape[1]):
            raise packfile.shape_error(path, f"D={packfile.clip(meta['dim'], 40)} (its metadata)",
                                       f"'embeds' {shape}", kind=KIND)
        packmeta.meta_text(path, meta, "model", default="unknown", kind=KIND)

    meta, tensors = packfile.read(path, kind=KIND, plan=plan)
    x = tensors["embeds"].float()
    try:
        src = tuple(int(i) for i in json.loads(meta.get("source_index", "[]")))
    except (ValueError, TypeError, RecursionError):
        src = ()
    if len(src) != x.shape[0]:
        src = (-1,) * x.shape[0]
    return FaceEmbeds(embeds=x, model=meta.get("model", "unknown"), normalized=meta.get("normalized") == "true",
                      source_index=src), meta
