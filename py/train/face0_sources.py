"""Face0 training data sources (Valevski et al. 2023, "Face0: Instantaneously Conditioning a Text-to-Image Model
on a Face", §4: image + caption pairs): a folder of images with .txt captions, a CSV/Parquet list of
(image, caption) rows, or WebDataset tars; enumerated in a fixed order so every machine agrees on item indices.
``face0_data`` turns them into shards.
"""

from __future__ import annotations

import csv
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass(frozen=True)
class SourceItem:
    """One input: an image file (or a member of a tar when ``member`` is set) and its caption."""

    image: str
    caption: str | None = None  # None: look it up in ``caption_member`` (tar) or it is missing
    member: str | None = None
    caption_member: str | None = None

    @property
    def where(self) -> str:
        return f"{self.image}#{self.member}" if self.member else self.image


# --- sources -------------------------------------------------------------------------------------------------
def folder_items(root: str | os.PathLike) -> list[SourceItem]:
    """Images under ``root`` (recursive, sorted); caption = the sibling ``.txt`` with the same stem, if any."""
    out = []
    for p in sorted(Path(root).rglob("*")):
        if p.suffix.lower() in IMAGE_EXTS and p.is_file():
            txt = p.with_suffix(".txt")
            out.append(SourceItem(str(p), txt.read_text(encoding="utf-8", errors="replace").strip()
                                  if txt.is_file() else None))
    return out


def _rows_items(rows: list[dict], base: Path, where: str) -> list[SourceItem]:
    if not rows:
        return []
    cols = {c.lower(): c for c in rows[0]}
    img = next((cols[c] for c in ("path", "image", "file", "filename") if c in cols), None)
    cap = next((cols[c] for c in ("caption", "text", "prompt") if c in cols), None)
    if img is None:
        raise ValueError(f"{where}: needs a column named path (or image/file) and one named caption (or text); "
                         f"found {list(rows[0])}")
    out = []
    for r in rows:
        p = Path(str(r[img]))
        text = (str(r[cap]).strip() or None) if cap and r.get(cap) is not None else None
        out.append(SourceItem(str(p if p.is_absolute() else base / p), text))
    return out


def csv_items(path: str | os.PathLike) -> list[SourceItem]:
    with open(path, newline="", encoding="utf-8") as f:
        return _rows_items(list(csv.DictReader(f)), Path(path).parent, str(path))


def parquet_items(path: str | os.PathLike) -> list[SourceItem]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise RuntimeError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow), or convert it to a CSV "
                           "with columns path,caption") from None
    return _rows_items(pq.read_table(path).to_pylist(), Path(path).parent, str(path))


def split_name(name: str) -> tuple[str, str]:
    """WebDataset's rule: key = path up to the first dot of the basename, extension = the rest (lower case)."""
    d, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return os.path.join(d, stem), ext.lower()


def tar_items(path: str | os.PathLike) -> list[SourceItem]:
    """The samples of a WebDataset tar holding KEY.{jpg,png,...} and KEY.txt."""
    groups: dict[str, dict[str, str]] = {}
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            if m.isfile():
                key, ext = split_name(m.name)
                groups.setdefault(key, {})[ext] = m.name
    out = []
    for key in sorted(groups):
        g = groups[key]
        img = next((g[e] for e in ("jpg", "jpeg", "png", "webp", "bmp") if e in g), None)
        if img is not None:
            out.append(SourceItem(str(path), None, img, g.get("txt")))
    return out


def source_items(sources: list[str]) -> list[SourceItem]:
    """All items of the given sources (folders, .csv, .parquet, .tar), in a fixed order."""
    out: list[SourceItem] = []
    for s in sources:
        p = Path(s)
        if p.is_dir():
            out += folder_items(p)
        elif p.suffix.lower() == ".csv":
            out += csv_items(p)
        elif p.suffix.lower() == ".parquet":
            out += parquet_items(p)
        elif p.suffix.lower() == ".tar":
            out += tar_items(p)
        else:
            raise ValueError(f"source {s!r}: expected a folder, a .csv, a .parquet or a .tar shard")
    return out


def read_item(item: SourceItem) -> tuple[bytes | None, str | None]:
    """(image bytes or None if unreadable, caption or None)."""
    if item.member is None:
        try:
            return Path(item.image).read_bytes(), item.caption
        except OSError:
            return None, item.caption
    with tarfile.open(item.image) as tf:
        data = tf.extractfile(item.member).read()
        cap = tf.extractfile(item.caption_member).read().decode("utf-8", "replace").strip() \
            if item.caption_member else None
    return data, cap or None
