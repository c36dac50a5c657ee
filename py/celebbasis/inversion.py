"""Textual inversion for faces (Livshits 2023, "Textual inversion modified for faces"; after Gal et al. 2022,
"An Image is Worth One Word", arXiv:2208.01618).

K learned token vectors stand for a person. Three initialisations:
- ``face``: the token embeddings of the phrase "human face" (repeated cyclically to K vectors);
- ``rand2``: "two random vectors from the vectorised celebrity names": K distinct names drawn with a seeded
  generator, vector j from name j, its first-name token for even j and its last-name token for odd j (a
  random first name with a random last name: the paper's intuition is that a person is a first and last name);
- ``id``: the first two token embeddings of the celebrity whose face is closest (cosine of face-recognition
  embeddings) to the person's. The celebrities' faces are either the mean embedding of real photos of each
  (``celeb_faces_from_photos``; the paper: "images of celebrities, filtered by face recognition against the
  model's own generations", ``filter_by_generated``), or the images the *loaded* model generates for each name,
  embedded once and cached per model (``CelebFaces`` files, see below).

Optional log-norm reparameterisation: learn a direction d and a log-norm n, ``v = a^n · d/||d||`` (a = 2 or e),
which keeps ||v|| near the vocabulary's norms; the gradient is ``∇_n L = ∇_v L · d/||d|| · a^n · ln a``.
Without it the paper uses l2 regularisation 0.01 (Adam's L2 term in ``py/train/core.TrainConfig``).

Two text encoders (SDXL: CLIP-L 768 + CLIP-G 1280): a vector is both encoders' parts side by side (K, 2048), every
init takes the same tokens' rows from both tables, and the log-norm is per table: each part has its own direction
and log-norm (``n`` is (K, 2)), since the two vocabularies have different norms. The file holds ``clip_l`` and
``clip_g`` (K, d) tensors, the layout ComfyUI's ``embedding:NAME`` reads for SDXL.

Celebrity-face cache (safetensors in models/facecond/celebbasis): tensor ``embeds`` (m, D) float32 (rows of
names without a detected face are NaN) and ``found`` (m,) uint8; metadata ``facecond.kind = "celeb_faces"``,
``model_hash``, ``embedder``, ``names`` (JSON list), ``names_hash``, ``prompt``, ``steps``, ``size``.
Pure torch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..weights import packfile
from ..weights.atomic import save_file
from .basis import Tables, as_tables, gather_rows, name_token_pairs, names_hash

INIT_MODES = ("face", "rand2", "id")
REPARAM = {"none": None, "log_norm_2": 2.0, "log_norm_e": math.e}  # option -> base a
FACE_PHRASE = "human face"
L2_WEIGHT = 0.01  # the paper's l2 regularisation without reparameterisation
FACES_KIND = "celeb_faces"
TI_KIND = "face_ti"


class TIVectors:
    """The trainable vectors: plain ``v`` (K, d), or (``d`` (K, d), ``n`` (K,)) with ``v = a^n · d/||d||``.
    ``dims`` (SDXL: (768, 1280)): the text encoders' parts of d, each with its own log-norm (``n`` (K, parts))."""

    def __init__(self, init: torch.Tensor, reparam: str = "none", dims: Sequence[int] = ()):
        if reparam not in REPARAM:
            raise ValueError(f"face TI: reparam must be one of {list(REPARAM)}, got {reparam!r}")
        if init.ndim != 2:
            raise ValueError(f"face TI: init vectors must be (K, d), got {tuple(init.shape)}")
        self.dims = tuple(int(x) for x in dims) if len(dims) > 1 else ()
        if self.dims and sum(self.dims) != init.shape[1]:
            raise ValueError(f"face TI: init vectors are {init.shape[1]}-d, not the encoders' {self.dims}")
        self.base = REPARAM[reparam]
        init = init.detach().float().clone()
        if self.base is None:
            self.params = {"v": init.requires_grad_(True)}
        else:
            if self.dims:
                norm = torch.stack([p.norm(dim=-1) for p in torch.split(init, self.dims, dim=-1)], -1)
            else:
                norm = init.norm(dim=-1)
            self.params = {"d": init.clone().requires_grad_(True),
                           "n": (torch.log(norm.clamp_min(1e-8)) / math.log(self.base)).requires_grad_(True)}

    def vectors(self) -> torch.Tensor:
        if self.base is None:
            return self.params["v"]
        d, n = self.params["d"], self.params["n"]
        if self.dims:
            return torch.cat([torch.pow(self.base, n[:, j]).unsqueeze(-1) * p / p.norm(dim=-1, keepdim=True)
                              for j, p in enumerate(torch.split(d, self.dims, dim=-1))], dim=-1)
        return torch.pow(self.base, n).unsqueeze(-1) * d / d.norm(dim=-1, keepdim=True)


def log_norm_grad(grad_v: torch.Tensor, d: torch.Tensor, n: torch.Tensor, base: float) -> torch.Tensor:
    """The paper's closed form ``∇_n L = ∇_v L · d/||d|| · a^n · ln a`` (per vector; for the tests)."""
    return (grad_v * d / d.norm(dim=-1, keepdim=True)).sum(-1) * torch.pow(base, n) * math.log(base)


def _cycle(rows: torch.Tensor, k: int) -> torch.Tensor:
    return rows[torch.arange(k) % rows.shape[0]]


def init_vectors(mode: str, table: Tables, tokenize: Callable[[str], list[int]], k: int, *,
                 names: Sequence[str] = (), seed: int = 0, celeb_faces: CelebFaces | None = None,
                 face: torch.Tensor | None = None) -> tuple[torch.Tensor, str]:
    """((K, d) initial vectors, what they are, e.g. "rand2: Tom Hanks") from the text encoder's token table, or
    the same tokens' rows of several tables side by side (SDXL: (K, 768 + 1280))."""
    if mode not in INIT_MODES:
        raise ValueError(f"face TI: init must be one of {INIT_MODES}, got {mode!r}")
    if k < 1:
        raise ValueError(f"face TI: need at least one vector, got K={k}")
    tables = as_tables(table)

    def t(ids: torch.Tensor) -> torch.Tensor:
        return gather_rows(tables, ids)

    if mode == "face":
        return _cycle(t(torch.tensor(tokenize(FACE_PHRASE))), k).clone(), f"face: {FACE_PHRASE!r}"
    kept, ids = name_token_pairs(names, tokenize)
    if not kept:
        raise ValueError("face TI: no celebrity name has two tokens; check the names list")
    if mode == "rand2":  # K distinct names (cycled when the list is shorter); name j gives token j % 2
        g = torch.Generator().manual_seed(int(seed))
        picks = _cycle(torch.randperm(len(kept), generator=g), k)
        rows = t(ids[picks, torch.arange(k) % 2])
        return rows.clone(), "rand2: " + ", ".join(f"{kept[int(i)]}[{j % 2}]" for j, i in enumerate(picks))
    else:
        if celeb_faces is None or face is None:
            raise ValueError("face TI: init='id' needs the celebrity face cache and the person's face embedding")
        j = celeb_faces.closest(face, kept)
        picks = torch.tensor([j])
    rows = t(ids[picks].flatten())
    return _cycle(rows, k).clone(), f"{mode}: " + ", ".join(kept[int(i)] for i in picks)


@dataclass(frozen=True)
class CelebFaces:
    """Face embeddings of the images a model generates for each celebrity name (the ``id`` init's cache)."""

    embeds: torch.Tensor  # (m, D) float32; NaN rows where no face was found
    found: torch.Tensor  # (m,) bool
    names: tuple[str, ...]
    model_hash: str
    embedder: str
    extra: dict

    def closest(self, face: torch.Tensor, candidates: Sequence[str]) -> int:
        """Index into ``candidates`` of the name whose generated face has the highest cosine with ``face`` (D,)."""
        if face.shape[-1] != self.embeds.shape[1]:
            raise ValueError(f"face TI: the face embedding is {face.shape[-1]}-d but the celebrity faces are "
                             f"{self.embeds.shape[1]}-d ({self.embedder}); embed with the same model")
        row = {n: i for i, n in enumerate(self.names)}
        idx = [row.get(n, -1) for n in candidates]
        ok = torch.tensor([i >= 0 and bool(self.found[i]) for i in idx])
        if not ok.any():
            raise ValueError("face TI: the celebrity face cache has no face for any listed name; precompute it again")
        e = torch.nn.functional.normalize(self.embeds[[max(i, 0) for i in idx]].nan_to_num(0.0), dim=-1)
        cos = e @ torch.nn.functional.normalize(face.float().flatten(), dim=0)
        return int(torch.where(ok, cos, torch.full_like(cos, -2.0)).argmax())


def celeb_faces_from_photos(names: Sequence[str], embeds: Sequence[torch.Tensor | None], embedder: str,
                            source: str = "") -> CelebFaces:
    """``CelebFaces`` from real photos: row i is the mean of name i's photo embeddings (each (n_i, D), rows
    L2-normalised first, the mean normalised again: a cosine centroid); None or an empty tensor (no face found in
    that name's photos) gives a NaN row that ``closest`` skips."""
    if len(names) != len(embeds) or not names:
        raise ValueError(f"celebrity photos: {len(names)} names but {len(embeds)} embedding sets; need one per name")
    dims = {int(e.shape[-1]) for e in embeds if e is not None and e.numel()}
    if len(dims) != 1:
        raise ValueError("celebrity photos: no face in any name's photos" if not dims else
                         f"celebrity photos: embeddings of different widths {sorted(dims)}; embed with one model")
    dim = dims.pop()
    rows, found = [], []
    for e in embeds:
        if e is None or not e.numel():
            rows.append(torch.full((dim,), float("nan")))
            found.append(False)
            continue
        unit = torch.nn.functional.normalize(e.detach().float().reshape(-1, dim), dim=-1)
        rows.append(torch.nn.functional.normalize(unit.mean(0), dim=0))
        found.append(True)
    return CelebFaces(torch.stack(rows), torch.tensor(found), tuple(names), "photos", embedder, {"source": source})


def filter_by_generated(photos: CelebFaces, generated: CelebFaces, threshold: float) -> tuple[CelebFaces, list[str]]:
    """The paper's filter (Livshits 2023: celebrities' images "filtered by face recognition against the model's
    own generations"): keep a name only when the model's generated portrait of it has a face whose cosine with
    the name's photo centroid is at least ``threshold`` (a name the model cannot draw recognisably would start
    the inversion from a vector that does not mean that face). Returns (the kept faces, the dropped names)."""
    if photos.embeds.shape[1] != generated.embeds.shape[1]:
        raise ValueError(f"celebrity filter: the photos are embedded {photos.embeds.shape[1]}-d ({photos.embedder}) "
                         f"but the generated faces {generated.embeds.shape[1]}-d ({generated.embedder}); use the "
                         "same face recogniser for both")
    row = {n: i for i, n in enumerate(generated.names)}
    gen = torch.nn.functional.normalize(generated.embeds.float().nan_to_num(0.0), dim=-1)
    keep, dropped = [], []
    for i, name in enumerate(photos.names):
        j = row.get(name)
        ok = bool(photos.found[i]) and j is not None and bool(generated.found[j])
        if ok:
            cos = float(gen[j] @ torch.nn.functional.normalize(photos.embeds[i].float(), dim=0))
            ok = cos >= threshold
        keep.append(ok)
        if bool(photos.found[i]) and not ok:
            dropped.append(name)
    found = photos.found & torch.tensor(keep, dtype=torch.bool)
    extra = {**photos.extra, "filter": f"generated>={threshold:g} ({generated.model_hash})"}
    return CelebFaces(photos.embeds, found, photos.names, photos.model_hash, photos.embedder, extra), dropped


def fingerprint(tensors: Sequence[torch.Tensor]) -> str:
    """Short sha256 over a few weight tensors (float32 bytes): a cheap id of a model's weights."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def faces_file_name(model_hash: str, embedder: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", embedder.split("@", maxsplit=1)[0]).strip("-")[:40]
    return f"celeb_faces_{model_hash}_{slug}_{hashlib.sha256(embedder.encode()).hexdigest()[:8]}.safetensors"


def save_celeb_faces(c: CelebFaces, path: str | os.PathLike) -> None:
    meta = {"facecond.kind": FACES_KIND, "model_hash": c.model_hash, "embedder": c.embedder,
            "names": json.dumps(list(c.names)), "names_hash": names_hash(c.names),
            **{k: str(v) for k, v in c.extra.items()}}
    save_file({"embeds": c.embeds.detach().float().cpu().contiguous(),
               "found": c.found.to(torch.uint8).cpu().contiguous()}, str(path), metadata=meta)


def load_celeb_faces(path: str | os.PathLike) -> CelebFaces:
    meta, t = packfile.read(path, kind=FACES_KIND, dtypes={"found": ("U8", "BOOL")},
                            finite=False)  # NaN rows: celebrities without a detected face
    try:
        names = tuple(json.loads(meta["names"]))
        model_hash, embedder = meta["model_hash"], meta["embedder"]
    except (KeyError, ValueError) as e:
        raise packfile.metadata_error(path, repr(e), kind=FACES_KIND) from None
    embeds, found = t.get("embeds"), t.get("found")
    if embeds is None or found is None or embeds.ndim != 2 or embeds.shape[0] != len(names) \
            or tuple(found.shape) != (len(names),):
        raise packfile.shape_error(path, f"'embeds' ({len(names)}, D) and 'found' ({len(names)},) for its "
                                   f"{len(names)} names", {k: tuple(v.shape) for k, v in t.items()}, kind=FACES_KIND)
    extra = {k: v for k, v in meta.items() if k not in ("facecond.kind", "model_hash", "embedder", "names",
                                                       "names_hash")}
    return CelebFaces(embeds.float(), found.bool(), names, model_hash, embedder, extra)


def embedding_file(vectors: torch.Tensor, key: str | Sequence[str], meta: dict,
                   dims: Sequence[int] = ()) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a face-TI embedding file (see ``save_embedding``). Several keys (SDXL: "clip_l",
    "clip_g"): ``vectors`` (K, sum of ``dims``) is split into one (K, d) tensor per key."""
    keys = [key] if isinstance(key, str) else list(key)
    parts = [vectors] if len(keys) == 1 else torch.split(vectors, list(dims), dim=-1)
    if len(parts) != len(keys) or sum(p.shape[-1] for p in parts) != vectors.shape[-1]:
        raise ValueError(f"face TI: {tuple(vectors.shape)} vectors do not split into {keys} of widths {list(dims)}")
    return ({k: p.detach().float().cpu().contiguous() for k, p in zip(keys, parts, strict=True)},
            {"facecond.kind": TI_KIND, **{k: str(v) for k, v in meta.items()}})


def save_embedding(vectors: torch.Tensor, path: str | os.PathLike, key: str | Sequence[str], meta: dict,
                   dims: Sequence[int] = ()) -> None:
    """A standard ComfyUI/A1111-style safetensors embedding: ``{key: (K, d)}`` (``sd1_clip.load_embed`` reads
    the text encoder's key, e.g. ``clip_l``; SDXL files have ``clip_l`` (K, 768) and ``clip_g`` (K, 1280)), plus
    our metadata (``facecond.kind = "face_ti"``)."""
    tensors, metadata = embedding_file(vectors, key, meta, dims)
    save_file(tensors, str(path), metadata=metadata)
