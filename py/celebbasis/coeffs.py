"""Celeb Basis coefficients: the face -> coefficient MLP and the files for MLPs and saved identities.

MLP (Yuan et al. 2023, §3.2): one linear layer from the face embedding f to 2 x p numbers, then L2
normalisation. Our choice (the paper does not fix the radius): each α_k is normalised to unit length and
multiplied by the basis' ``scale[k]``, the mean coefficient norm of the listed names, so an output sits where
real names sit in the basis.

Files (safetensors; metadata are strings):
- MLP: tensors ``weight`` (2p, D), ``bias`` (2p); metadata ``facecond.kind = "celeb_mlp"``, ``embedder``,
  ``embed_dim``, ``p``, ``table_hash``, ``names_hash``, ``family``, ``scale`` (JSON [s1, s2]), ``names`` (JSON
  list: the list the basis was built from, so the node rebuilds the same basis), ``steps``.
- Coefficients (a saved identity, 2 x p fp16 = 2 KB for p = 512): tensor ``coeffs`` (2, p) float16;
  metadata ``facecond.kind = "celeb_coeffs"``, ``p``, ``table_hash``, ``names_hash``, ``family``, ``word``,
  ``source``.

``family``: the model family whose text encoder(s) the basis came from ("SD1.x", "SD2.x", "SDXL"; see
``nodes/celebbasis/pseudo_words.family_of``). Files written before it was recorded have none: they were made on
a one-encoder model (SD1.x / SD2.x), the only kind the basis then supported.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import torch

from ..weights import packfile, packmeta
from ..weights.atomic import save_file
from .basis import MAX_NAME_CHARS, MAX_NAMES, CelebBasis

MLP_KIND = "celeb_mlp"
COEFFS_KIND = "celeb_coeffs"
FAMILY_ENCODERS = {"SD1.x": "CLIP-L, 768", "SD2.x": "OpenCLIP-H, 1024", "SDXL": "CLIP-L 768 + CLIP-G 1280",
                   "SDXL refiner": "CLIP-G, 1280"}
LEGACY_FAMILY = "SD1.x/SD2.x"  # files without a family: made before SDXL was supported
LEGACY_FAMILIES = ("SD1.x", "SD2.x")


class CoeffMLP(torch.nn.Module):
    """f (B, D) -> α (B, 2, p): Linear, then per-k L2 normalisation times the basis' name-coefficient radius."""

    def __init__(self, embed_dim: int, p: int, scale: torch.Tensor):
        super().__init__()
        self.fc = torch.nn.Linear(embed_dim, 2 * p)
        self.register_buffer("scale", scale.detach().float().clone().view(2, 1))
        self.p = p

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        a = self.fc(f.float()).view(-1, 2, self.p)
        return torch.nn.functional.normalize(a, dim=-1) * self.scale


@dataclass(frozen=True)
class BasisFacts:
    """What a coefficient (or MLP) file was made for; compared with the basis built from the loaded CLIP."""

    p: int
    table_hash: str
    names_hash: str
    extra: dict = field(default_factory=dict)
    family: str = ""  # "" = written before families were recorded (a one-encoder SD1.x / SD2.x model)

    def check(self, basis: CelebBasis, what: str) -> None:
        mine = self.family or LEGACY_FAMILY
        if basis.family and mine != basis.family and not (not self.family and basis.family in LEGACY_FAMILIES):
            raise ValueError(f"{what} was made for an {mine} model but this CLIP is {basis.family}: the "
                             "coefficients are coordinates in the celebrity-name basis of that family's token "
                             f"table(s) ({mine}: {FAMILY_ENCODERS.get(mine, 'its text encoders')}; {basis.family}: "
                             f"{FAMILY_ENCODERS.get(basis.family, 'its text encoders')}), which mean nothing in "
                             f"another's. Load an {mine} checkpoint, or make them anew for this one "
                             "(TrainCelebBasis on this model).")
        if self.p != basis.p:
            raise ValueError(f"{what} has {self.p}-component coefficients but the basis of this CLIP has p={basis.p}; "
                             "they were made with another basis size (another name list or p). Use the coefficient "
                             "MLP / names list they were made with.")
        if self.names_hash != basis.names_hash:
            raise ValueError(f"{what} was made with celebrity-name list {self.names_hash}, not {basis.names_hash}; "
                             "use the same names list.")
        if self.table_hash != basis.table_hash:
            raise ValueError(f"{what} was made for a text encoder whose token table hashes to {self.table_hash}, "
                             f"but this CLIP's is {basis.table_hash} (another model). Load the checkpoint it was "
                             "made with, or make new coefficients for this one.")


def new_mlp(embed_dim: int, basis: CelebBasis, seed: int) -> CoeffMLP:
    g = torch.Generator().manual_seed(int(seed))
    mlp = CoeffMLP(embed_dim, basis.p, basis.scale)
    bound = 1.0 / embed_dim ** 0.5  # nn.Linear's default init, drawn from our seeded generator
    with torch.no_grad():
        mlp.fc.weight.uniform_(-bound, bound, generator=g)
        mlp.fc.bias.uniform_(-bound, bound, generator=g)
    return mlp


def mlp_file(mlp: CoeffMLP, basis: CelebBasis, *, embedder: str, names: list[str],
             steps: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of an MLP file (``save_mlp`` writes them; the trainer writes them with its state)."""
    meta = {"facecond.kind": MLP_KIND, "embedder": embedder, "embed_dim": str(mlp.fc.in_features),
            "p": str(mlp.p), "table_hash": basis.table_hash, "names_hash": basis.names_hash, "family": basis.family,
            "scale": json.dumps([float(s) for s in mlp.scale.flatten()]), "names": json.dumps(list(names)),
            "steps": str(int(steps))}
    return {"weight": mlp.fc.weight.detach().cpu().float().contiguous(),
            "bias": mlp.fc.bias.detach().cpu().float().contiguous()}, meta


def save_mlp(mlp: CoeffMLP, path: str | os.PathLike, basis: CelebBasis, *, embedder: str, names: list[str],
             steps: int) -> None:
    tensors, meta = mlp_file(mlp, basis, embedder=embedder, names=names, steps=steps)
    save_file(tensors, str(path), metadata=meta)


MAX_P, MAX_EMBED_DIM = 8192, 8192  # bounds on the metadata numbers of MLP and coefficient files (README "Limits")


def _names_ok(v) -> bool:
    return isinstance(v, list) and 2 <= len(v) <= MAX_NAMES and all(
        isinstance(n, str) and 0 < len(n) <= MAX_NAME_CHARS for n in v)


def load_mlp(path: str | os.PathLike) -> tuple[CoeffMLP, dict]:
    """(MLP, info): info has embedder, embed_dim, names (list), facts (BasisFacts), steps. The metadata numbers
    within their bounds and the tensor shapes they call for are checked from the header before any tensor is
    read; float weights only, all finite. A wrong or unreadable file raises ``packfile.PackFileError`` (a
    ValueError) with the path and the fix."""
    info: dict = {}

    def plan(meta, specs):
        p = packmeta.meta_int(path, meta, "p", 1, MAX_P, kind=MLP_KIND)
        d = packmeta.meta_int(path, meta, "embed_dim", 1, MAX_EMBED_DIM, kind=MLP_KIND)
        expected = {"weight": (2 * p, d), "bias": (2 * p,)}
        found = {k: shape for k, (_, shape) in specs.items()}
        if found != expected:
            raise packfile.shape_error(path, f"{expected} for p={p}, embed_dim={d}", found, kind=MLP_KIND)
        scale = packmeta.meta_json(path, meta, "scale", lambda v: isinstance(v, list) and len(v) == 2 and all(
            type(x) in (int, float) and math.isfinite(x) and x > 0 for x in v), "a JSON list of 2 positive numbers",
            kind=MLP_KIND)
        names = packmeta.meta_json(path, meta, "names", _names_ok, f"a JSON list of 2 to {MAX_NAMES:,} names of at "
                                   f"most {MAX_NAME_CHARS} characters", kind=MLP_KIND)
        facts = BasisFacts(p, *(packmeta.meta_text(path, meta, k, kind=MLP_KIND) for k in ("table_hash", "names_hash")),
                           family=packmeta.meta_text(path, meta, "family", default="", limit=40, kind=MLP_KIND))
        info.update(embedder=packmeta.meta_text(path, meta, "embedder", kind=MLP_KIND), embed_dim=d, names=names,
                    facts=facts, steps=packmeta.meta_int(path, meta, "steps", 0, 10**9, default=0, kind=MLP_KIND),
                    scale=scale)

    _, t = packfile.read(path, kind=MLP_KIND, plan=plan)
    scale = info.pop("scale")
    mlp = CoeffMLP(info["embed_dim"], info["facts"].p, torch.tensor(scale, dtype=torch.float32))
    with torch.no_grad():
        mlp.fc.weight.copy_(t["weight"].float())
        mlp.fc.bias.copy_(t["bias"].float())
    return mlp.eval(), info


@dataclass(frozen=True)
class CelebCoeffs:
    """The CELEB_COEFFS socket: one identity's 2 x p coefficients and the basis they belong to."""

    coeffs: torch.Tensor  # (2, p) float32 (values are fp16-exact when they come from a file)
    facts: BasisFacts
    source: str = ""


def save_coeffs(c: CelebCoeffs, path: str | os.PathLike, word: str = "") -> None:
    meta = {"facecond.kind": COEFFS_KIND, "p": str(c.facts.p), "table_hash": c.facts.table_hash,
            "names_hash": c.facts.names_hash, "family": c.facts.family, "word": word, "source": c.source}
    save_file({"coeffs": c.coeffs.detach().cpu().to(torch.float16).contiguous()}, str(path), metadata=meta)


def load_coeffs(path: str | os.PathLike) -> CelebCoeffs:
    """A saved identity: ``coeffs`` (2, p), 1 <= p <= ``MAX_P`` as its metadata says (checked from the header
    before it is read); float values only, all finite. ``packfile.PackFileError`` otherwise."""
    facts: list[BasisFacts] = []

    def plan(meta, specs):
        p = packmeta.meta_int(path, meta, "p", 1, MAX_P, kind=COEFFS_KIND)
        facts.append(BasisFacts(p, *(packmeta.meta_text(path, meta, k, kind=COEFFS_KIND)
                                     for k in ("table_hash", "names_hash")), {"word": meta.get("word")},
                                family=packmeta.meta_text(path, meta, "family", default="", limit=40,
                                                          kind=COEFFS_KIND)))
        found = {k: shape for k, (_, shape) in specs.items()}
        if found.get("coeffs") != (2, p):
            raise packfile.shape_error(path, f"'coeffs' (2, {p})", found, kind=COEFFS_KIND)

    meta, t = packfile.read(path, kind=COEFFS_KIND, plan=plan)
    return CelebCoeffs(t["coeffs"].float(), facts[0], packfile.clip(meta.get("source", "")))


def fp16_exact(x: torch.Tensor) -> torch.Tensor:
    """Round to float16 and back: the values a coefficients file stores, so a saved identity reproduces the
    node's conditioning bit for bit."""
    return x.to(torch.float16).float()
