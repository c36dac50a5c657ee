"""Face0 training data: image+caption sources (``face0_sources``) → WebDataset tar shards of (image/latent,
caption, face).

Face0 (Valevski et al. 2023, §4) trained on (image, caption, face embedding) triplets: LAION images with a
face over 20 px, the largest face only, MTCNN box enlarged by Face0's margins, embedded with FaceNet.

Shard format (WebDataset: a plain tar, members grouped by the key before the first dot), written and read with
the stdlib ``tarfile``: ``KEY.jpg`` (the image, short side resized to the training resolution and centre-cropped),
optionally ``KEY.latent.safetensors`` (tensor ``latent`` (4, R/8, R/8): the VAE encode, ComfyUI's LATENT
convention, i.e. before ``process_latent_in``), ``KEY.txt`` (UTF-8 caption) and ``KEY.face.safetensors``
(``embedding`` (D,), ``box`` (4,) x1 y1 x2 y2 in the stored image's pixels, ``original_size`` (2,) int64 height,
width of the decoded photo before resizing, ``crop_top_left`` (2,) int64 top, left of the centre crop in the resized
image's pixels; metadata ``embedder``, ``normalized``, ``source``). The last two are SDXL's micro-conditioning
(Podell et al. 2023, "SDXL", sec. 2.2: the U-Net's ADM vector embeds the original size, the crop's top-left corner
and the target size); shards written before they existed lack them, which SD1.x / SD2.x training never reads.
Keys are the item's global index (``%09d``), so every machine that enumerates the same sources agrees on which item goes
into which shard.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..faces import crop
from .face0_sources import SourceItem, read_item, split_name

REASONS = ("corrupt_image", "no_face", "missing_caption")


# --- one sample ----------------------------------------------------------------------------------------------
@dataclass
class FaceModel:
    """What preparation needs from the face models (built by the CLI): MTCNN-style detector, an embedder."""

    detector: object  # ``detect(images (B,H,W,3) 0..255, min_size) -> list[Detections]``
    embed: Callable  # Faces -> (N, D) float32
    model_id: str
    normalized: bool


@dataclass(frozen=True)
class PrepConfig:
    resolution: int = 512  # stored image side: the model's native size (Face0 trained SD1.x at 512; SDXL 1024)
    min_face: int = 20  # Face0 kept faces over 20 px (in the original image's pixels)
    detect_max_side: int = 1024  # detection/cropping on the image downscaled to this longer side
    margin_scale: float = 1.0  # Face0's crop margins (10/10/33/15 px of the 160-px crop)
    jpeg_quality: int = 95


def decode_image(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return ImageOps.exif_transpose(img).convert("RGB")


def square_crop(img: Image.Image, side: int) -> tuple[Image.Image, float, float, float]:
    """Short side resized to ``side``, centre-cropped; (image, scale, x offset, y offset) to map boxes."""
    w, h = img.size
    s = side / min(w, h)
    nw, nh = max(side, round(w * s)), max(side, round(h * s))
    x0, y0 = (nw - side) // 2, (nh - side) // 2
    out = img.resize((nw, nh), Image.BICUBIC).crop((x0, y0, x0 + side, y0 + side))
    return out, s, float(x0), float(y0)


def face_of(img: Image.Image, fm: FaceModel, cfg: PrepConfig) -> tuple[torch.Tensor, np.ndarray] | None:
    """(embedding (D,), box in ``img`` pixels) of the largest face at least ``min_face`` px, or None."""
    w, h = img.size
    s = min(1.0, cfg.detect_max_side / max(w, h))
    work = img if s == 1.0 else img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR)
    arr = np.asarray(work, np.float32)[None]  # (1, h, w, 3) 0..255
    min_size = max(8, round(cfg.min_face * s))
    found = crop.detect_faces(fm.detector, arr, min_size=min_size, select_mode="largest", face_index=0,
                              upright="off")
    if not found[0]:
        return None
    res = crop.crop_faces(arr / 255.0, found, no_face="skip", margin_scale=cfg.margin_scale,
                          detector_name="mtcnn", min_size=min_size)
    emb = fm.embed(res.faces)[0].float()
    return emb, found[0][0].box / s


def encode_sample(key: str, img: Image.Image, caption: str, emb: torch.Tensor, box: np.ndarray, fm: FaceModel,
                  source: str, cfg: PrepConfig) -> dict[str, bytes]:
    """The tar members of one sample (latents are added later, batched)."""
    out_img, s, x0, y0 = square_crop(img, cfg.resolution)
    b = torch.tensor([box[0] * s - x0, box[1] * s - y0, box[2] * s - x0, box[3] * s - y0], dtype=torch.float32)
    buf = io.BytesIO()
    out_img.save(buf, format="JPEG", quality=cfg.jpeg_quality)
    meta = {"embedder": fm.model_id, "normalized": "true" if fm.normalized else "false", "source": source}
    w, h = img.size
    face = st_save({"embedding": emb.contiguous(), "box": b, "original_size": torch.tensor([h, w]),
                    "crop_top_left": torch.tensor([int(y0), int(x0)])}, metadata=meta)
    return {f"{key}.jpg": buf.getvalue(), f"{key}.txt": caption.encode("utf-8"), f"{key}.face.safetensors": face}


def latent_member(latent: torch.Tensor) -> bytes:
    return st_save({"latent": latent.detach().float().cpu().contiguous()})


# --- shards --------------------------------------------------------------------------------------------------
def shard_name(i: int) -> str:
    return f"shard-{i:06d}.tar"


def plan_shards(n_items: int, shard_size: int) -> list[range]:
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    return [range(a, min(a + shard_size, n_items)) for a in range(0, n_items, shard_size)]


def my_shards(n_shards: int, shard_index: int, num_shards: int) -> list[int]:
    """The shards machine ``shard_index`` of ``num_shards`` writes: every num_shards-th one."""
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"--shard-index {shard_index} must be in [0, --num-shards {num_shards})")
    return list(range(shard_index, n_shards, num_shards))


def write_tar(path: str | os.PathLike, members: dict[str, bytes]) -> None:
    """Write atomically (a .tmp file renamed at the end), members in insertion order (grouped by key)."""
    tmp = f"{path}.tmp"
    with tarfile.open(tmp, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tf.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)


def iter_shard(path: str | os.PathLike) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample, in the tar's order."""
    with tarfile.open(path) as tf:
        key, group = None, {}
        for m in tf:
            if not m.isfile():
                continue
            k, ext = split_name(m.name)
            if k != key and group:
                yield key, group
                group = {}
            key = k
            group[ext] = tf.extractfile(m).read()
        if group:
            yield key, group


def shard_keys(path: str | os.PathLike) -> list[str]:
    with tarfile.open(path) as tf:
        return list(dict.fromkeys(split_name(n)[0] for n in tf.getnames()))


def decode_sample(group: dict[str, bytes]) -> dict:
    """A shard sample as tensors: ``latent`` (4, h, w) or ``image`` (H, W, 3) in [0, 1]; caption; embedding;
    box; embedder; ``original_size`` (height, width) and ``crop_top_left`` (top, left) as int tuples, or None in
    shards written before they were stored."""
    raw = group["face.safetensors"]
    face = st_load(raw)
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])  # safetensors: u64 length + JSON header
    out = {"caption": group["txt"].decode("utf-8"), "embedding": face["embedding"], "box": face["box"],
           "embedder": header.get("__metadata__", {}).get("embedder", ""),
           "original_size": tuple(int(v) for v in face["original_size"]) if "original_size" in face else None,
           "crop_top_left": tuple(int(v) for v in face["crop_top_left"]) if "crop_top_left" in face else None}
    if "latent.safetensors" in group:
        out["latent"] = st_load(group["latent.safetensors"])["latent"]
    else:
        out["image"] = torch.from_numpy(np.asarray(decode_image(group["jpg"]), np.float32) / 255.0)
    return out


@dataclass
class ShardReport:
    shard: int
    written: int = 0
    skipped: dict[str, list[str]] = field(default_factory=lambda: {r: [] for r in REASONS})
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"shard": self.shard, "written": self.written, "seconds": round(self.seconds, 3),
                "skipped": {r: len(v) for r, v in self.skipped.items()}, "skipped_files": self.skipped}


def summarize(out_dir: str | os.PathLike, n_items: int, n_shards: int, examples: int = 20) -> dict:
    """Sum of the per-shard reports in ``out_dir`` (the finished shards of every machine and worker)."""
    reps = [json.loads(p.read_text()) for p in sorted(Path(out_dir).glob("shard-*.json"))]
    skipped = {r: sum(x["skipped"].get(r, 0) for x in reps) for r in REASONS}
    files = {r: [f for x in reps for f in x["skipped_files"].get(r, [])][:examples] for r in REASONS}
    secs = sum(x["seconds"] for x in reps)
    done = sum(x["written"] for x in reps) + sum(skipped.values())
    return {"items": n_items, "shards": n_shards, "shards_done": len(reps),
            "written": sum(x["written"] for x in reps), "skipped": skipped, "skipped_examples": files,
            "worker_seconds": round(secs, 2), "images_per_worker_second": round(done / secs, 2) if secs else None}


def prepare_shard(items: list[SourceItem], first_key: int, path: str | os.PathLike, fm: FaceModel,
                  cfg: PrepConfig, encode_latents: Callable | None = None) -> ShardReport:
    """Detect, embed (and VAE-encode) ``items`` into one shard at ``path``; bad items are skipped and counted.

    ``encode_latents``: (B, R, R, 3) float in [0, 1] -> (B, 4, R/8, R/8), or None to store images only.
    Writes the shard, then ``<shard>.json`` (its report, which also marks the shard finished).
    """
    import time

    t0 = time.perf_counter()
    shard = int(Path(path).stem.split("-")[-1])
    rep = ShardReport(shard)
    members: dict[str, bytes] = {}
    keys = []
    for j, item in enumerate(items):
        data, caption = read_item(item)
        if caption is None:
            rep.skipped["missing_caption"].append(item.where)
            continue
        try:
            img = decode_image(data) if data is not None else None
        except (OSError, ValueError, Image.DecompressionBombError):
            img = None
        if img is None:
            rep.skipped["corrupt_image"].append(item.where)
            continue
        face = face_of(img, fm, cfg)
        if face is None:
            rep.skipped["no_face"].append(item.where)
            continue
        key = f"{first_key + j:09d}"
        members.update(encode_sample(key, img, caption, face[0], face[1], fm, item.where, cfg))
        keys.append(key)
    if encode_latents is not None and keys:
        order = {}
        for i in range(0, len(keys), 8):
            batch = keys[i:i + 8]
            imgs = torch.stack([decode_sample({"jpg": members[f"{k}.jpg"], "txt": b"",
                                               "face.safetensors": members[f"{k}.face.safetensors"]})["image"]
                                for k in batch])
            for k, lat in zip(batch, encode_latents(imgs)):
                order[k] = latent_member(lat)
        members = {name: data for k in keys for name, data in
                   ((f"{k}.jpg", members[f"{k}.jpg"]), (f"{k}.latent.safetensors", order[k]),
                    (f"{k}.txt", members[f"{k}.txt"]), (f"{k}.face.safetensors", members[f"{k}.face.safetensors"]))}
    write_tar(path, members)
    rep.written = len(keys)
    rep.seconds = time.perf_counter() - t0
    Path(f"{os.path.splitext(path)[0]}.json").write_text(json.dumps(rep.to_json(), indent=1))
    return rep
