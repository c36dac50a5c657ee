"""Celeb Basis (Yuan et al. 2023, "Inserting Anybody in Diffusion Models via Celeb Basis", §3.1).

Celebrity names are tokenised with the model's own tokenizer; the token embeddings of the first two tokens of
each name (from the *loaded* text encoder's table) form C1 and C2 (m x d each). For k = 1, 2: mean C̄_k and a
PCA basis B_k (p x d, orthonormal rows). A new identity is the pseudo-word [v̂_1, v̂_2] with
``v̂_k = C̄_k + α_k B_k`` (α_k: p coefficients), i.e. 2 x p numbers per person.

Rule for p: ``p_eff = min(p, m - 1, d)``. The centred name embeddings span at most m - 1 directions (and the
space has d), so components beyond that would be arbitrary; with p_eff = m - 1 every listed name is
reconstructed exactly from its own coefficients. Default p = 512 (the paper's), which a 628-name list allows.

Names with fewer than two tokens are skipped (the paper keeps the first two tokens, k_i = 2).
Pure torch; the caller passes the embedding table and a ``tokenize(name) -> token ids`` function.

Models with two text encoders (SDXL: CLIP-L 768 + CLIP-G 1280, one BPE vocabulary) pass both token tables; the
basis is then **one PCA over the concatenated rows** [L; G] (d = 2048): C_k holds, for every name, its k-th
token's CLIP-L row next to its CLIP-G row. Why one joint basis rather than a basis (and an MLP head) per table:
every principal direction is a combination of the centred name rows, and here the *same* combination in both
tables, so one set of 2 x p coefficients means the same mixture of celebrities to both encoders (two separate
bases would let the L and G halves of a pseudo-word drift to different people, and double the MLP's output); the
coefficient files, the MLP and the p rule stay as for one encoder (``p_eff = min(p, m - 1, 2048)``, with m - 1
the binding one for any real list, so every listed name is still reconstructed exactly in both tables). The
tables are not re-weighted: PCA sees the embeddings at the scale the encoders read them. A single table is the
same computation as before (SD1.x / SD2.x results are bit-identical).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("facecond")

NAMES_FILE = Path(__file__).resolve().parents[2] / "data" / "celeb_names.txt"
DEFAULT_P = 512
_CACHE: dict[tuple[str, str, int], CelebBasis] = {}
_CACHE_SIZE = 4


MAX_NAMES, MAX_NAME_CHARS = 10_000, 100  # a name list (README "Limits"; the paper's has 691 names, the pack's ~600)
MAX_NAMES_BYTES = 1 << 20  # a names file or names_text: 1 MB (10,000 names of 100 characters)


def parse_names(text: str, source: str = "names text") -> list[str]:
    """Names from text (one per line, ``#`` comments), whitespace-normalised, case-insensitive dedup.
    ValueError naming ``source`` when fewer than 2 names are left (fewer cannot span a basis), or when the text
    or a name is longer than the bounds (``MAX_NAMES_BYTES``, ``MAX_NAMES``, ``MAX_NAME_CHARS``)."""
    if len(text) > MAX_NAMES_BYTES:
        raise ValueError(f"celebrity name list {source} is {len(text):,} characters long; at most "
                         f"{MAX_NAMES_BYTES:,} ({MAX_NAMES:,} names of at most {MAX_NAME_CHARS} characters)")
    seen, out = set(), []
    for i, line in enumerate(text.splitlines()):
        name = " ".join(line.split())
        if not name or name.startswith("#") or name.lower() in seen:
            continue
        if len(name) > MAX_NAME_CHARS:
            raise ValueError(f"celebrity name list {source}: line {i + 1} is {len(name):,} characters long "
                             f"({name[:40]!r}...); a name has at most {MAX_NAME_CHARS}: one name per line")
        seen.add(name.lower())
        out.append(name)
        if len(out) > MAX_NAMES:
            raise ValueError(f"celebrity name list {source} has more than {MAX_NAMES:,} names; give at most "
                             f"{MAX_NAMES:,} (the paper's list has 691)")
    if len(out) < 2:
        got = "no names" if not out else f"only 1 name ({out[0][:40]!r})"
        raise ValueError(f"celebrity name list {source} has {got}: write one name per line (e.g. 'Tom Hanks'), at "
                         "least 2 (a basis needs 2; the pack's list has ~600); lines starting with # are comments")
    return out


def load_names(path: str | Path | None = None) -> list[str]:
    """Names from a text file (see ``parse_names``); the pack's bundled list when ``path`` is None.
    ValueError naming the file when it is missing, larger than ``MAX_NAMES_BYTES``, not UTF-8 text, or holds
    fewer than 2 names."""
    path = Path(path) if path else NAMES_FILE
    if not path.is_file():
        raise ValueError(f"celebrity name list {path} not found")
    size = path.stat().st_size
    if size > MAX_NAMES_BYTES:
        raise ValueError(f"celebrity name list {path} is {size:,} bytes; at most {MAX_NAMES_BYTES:,} "
                         f"({MAX_NAMES:,} names of at most {MAX_NAME_CHARS} characters): is it a name list?")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"celebrity name list {path} is not UTF-8 text ({e.reason} at byte {e.start}); save it "
                         "as UTF-8, one name per line") from None
    if "\0" in text:
        raise ValueError(f"celebrity name list {path} contains NUL bytes (a binary file?); give a text file, "
                         "one name per line")
    return parse_names(text, str(path))


MAX_TEMPLATES, MAX_TEMPLATE_CHARS = 256, 1000  # prompt templates of a trainer (README "Limits")


def split_templates(text: str, node: str, input_name: str = "prompt_templates") -> list[str]:
    """The non-empty lines of a trainer's prompt-template text, stripped; ValueError naming the node and input
    when there are more than ``MAX_TEMPLATES`` or a line is longer than ``MAX_TEMPLATE_CHARS`` characters (a
    template is encoded as one 77-token CLIP chunk: ~300 characters), checked before anything is tokenised."""
    if len(text) > MAX_TEMPLATES * (MAX_TEMPLATE_CHARS + 1):
        raise ValueError(f"{node}: {input_name} is {len(text):,} characters long; give at most {MAX_TEMPLATES} "
                         f"templates of at most {MAX_TEMPLATE_CHARS} characters, one a line.")
    lines = [t.strip() for t in text.splitlines() if t.strip()]
    long = next((i for i, t in enumerate(lines) if len(t) > MAX_TEMPLATE_CHARS), None)
    if len(lines) > MAX_TEMPLATES or long is not None:
        what = f"has {len(lines):,} templates" if long is None else \
            f"template {long + 1} is {len(lines[long]):,} characters long ({lines[long][:40]!r}...)"
        raise ValueError(f"{node}: {input_name} {what}; give at most {MAX_TEMPLATES} templates of at most "
                         f"{MAX_TEMPLATE_CHARS} characters, one a line, each with {{}} where the person goes.")
    return lines


def names_hash(names: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(names).encode("utf-8")).hexdigest()[:16]


Tables = torch.Tensor | Sequence[torch.Tensor]  # one token table (vocab, d), or one per text encoder (SDXL: L, G)


def as_tables(table: Tables) -> list[torch.Tensor]:
    tables = [table] if torch.is_tensor(table) else list(table)
    if not tables or any(t.ndim != 2 for t in tables):
        raise ValueError("Celeb basis: token-embedding tables must be (vocab, d), got "
                         f"{[tuple(t.shape) for t in tables]}")
    if len({t.shape[0] for t in tables}) != 1:
        raise ValueError(f"Celeb basis: the text encoders' tables have different vocabularies "
                         f"{[t.shape[0] for t in tables]}; they must share one tokenizer")
    return tables


def gather_rows(table: Tables, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` of the table(s), float32 on the CPU, the tables' rows side by side (..., sum of d)."""
    rows = [t.detach()[ids.to(t.device)].to("cpu", torch.float32) for t in as_tables(table)]
    return rows[0] if len(rows) == 1 else torch.cat(rows, dim=-1)


_HASHES: dict[tuple, str] = {}  # one table's hash by where it lives and its version (see _one_hash)


def _one_hash(t: torch.Tensor) -> str:
    """sha256 of one table's float32 bytes, memoised per (storage address, shape, dtype, in-place version, and
    the bytes of 16 spread rows): every node that builds the basis asks for it, and SDXL's two tables are 400 MB."""
    t = t.detach()
    rows = t[torch.linspace(0, t.shape[0] - 1, 16).long().to(t.device)].to("cpu", torch.float32)
    try:
        version = t._version
    except RuntimeError:  # an inference tensor (loaded by the server) keeps no version counter: the rows decide
        version = -1
    key = (t.data_ptr(), tuple(t.shape), t.dtype, str(t.device), version,
           hashlib.sha256(rows.contiguous().numpy().tobytes()).hexdigest())
    if key not in _HASHES:
        if len(_HASHES) >= 16:
            _HASHES.pop(next(iter(_HASHES)))
        _HASHES[key] = hashlib.sha256(t.to("cpu", torch.float32).contiguous().numpy().tobytes()).hexdigest()
    return _HASHES[key]


def table_hash(table: Tables) -> str:
    """Short sha256 of the token-embedding table(s) (float32 bytes, in order): identifies the text encoders'
    vocabulary. One table hashes as it always did."""
    tables = as_tables(table)
    if len(tables) == 1:
        return _one_hash(tables[0])[:16]
    return hashlib.sha256("".join(_one_hash(t) for t in tables).encode()).hexdigest()[:16]


def effective_p(p: int, m: int, d: int) -> int:
    if m < 2:
        raise ValueError(f"Celeb basis: need at least 2 usable names, got {m}")
    return max(1, min(int(p), m - 1, d))


@dataclass(frozen=True)
class CelebBasis:
    mean: torch.Tensor  # (2, d) float32: C̄_1, C̄_2
    basis: torch.Tensor  # (2, p, d) float32, orthonormal rows per k
    scale: torch.Tensor  # (2,) float32: mean ||α_k|| of the listed names (the radius the coefficient MLP targets)
    names: tuple[str, ...]  # names actually used (two tokens or more)
    table_hash: str
    names_hash: str  # hash of the full (deduplicated) input list, as stored in MLP / coefficient files
    dims: tuple[int, ...] = ()  # the width of each text encoder's part of d (SDXL: (768, 1280)); () = (d,)
    family: str = ""  # the model family of the text encoder(s), e.g. "SDXL" (the node sets it; files record it)

    @property
    def p(self) -> int:
        return int(self.basis.shape[1])

    @property
    def dim(self) -> int:
        return int(self.basis.shape[2])

    @property
    def parts(self) -> tuple[int, ...]:
        return self.dims or (self.dim,)

    @property
    def basis_id(self) -> str:
        return f"{self.table_hash}/{self.names_hash}/p{self.p}"

    def embeddings(self, coeffs: torch.Tensor) -> torch.Tensor:
        """(..., 2, p) coefficients -> (..., 2, d) pseudo-word token embeddings ``C̄_k + α_k B_k``."""
        if coeffs.shape[-2:] != (2, self.p):
            raise ValueError(f"Celeb basis: coefficients must end in (2, {self.p}), got {tuple(coeffs.shape)}")
        b = self.basis.to(coeffs.device, coeffs.dtype)
        return self.mean.to(coeffs.device, coeffs.dtype) + torch.einsum("...kp,kpd->...kd", coeffs, b)

    def project(self, vectors: torch.Tensor) -> torch.Tensor:
        """(..., 2, d) token embeddings -> (..., 2, p) coefficients (least squares: orthonormal basis)."""
        centred = vectors.float() - self.mean.to(vectors.device)
        return torch.einsum("...kd,kpd->...kp", centred, self.basis.to(vectors.device))


def name_token_pairs(names: Sequence[str], tokenize: Callable[[str], list[int]]) -> tuple[list[str], torch.Tensor]:
    """(kept names, (m, 2) long): the first two token ids of each name; names with one token are skipped."""
    kept, ids = [], []
    for name in names:
        toks = list(tokenize(name))
        if len(toks) >= 2:
            kept.append(name)
            ids.append(toks[:2])
    skipped = len(names) - len(kept)
    if skipped:
        log.info("[facecond] Celeb basis: %d of %d names have a single token and are skipped", skipped, len(names))
    return kept, torch.tensor(ids, dtype=torch.long).view(-1, 2)


def build_basis(table: Tables, names: Sequence[str], tokenize: Callable[[str], list[int]],
                p: int = DEFAULT_P, *, t_hash: str | None = None) -> CelebBasis:
    """PCA of the first/second name-token embeddings (of one table, or of several side by side: see the module
    docstring); see there for the p rule too."""
    tables = as_tables(table)
    kept, ids = name_token_pairs(names, tokenize)
    vocab = tables[0].shape[0]
    if ids.numel() and int(ids.max()) >= vocab:
        raise ValueError(f"Celeb basis: token id {int(ids.max())} outside the table of {vocab} tokens; "
                         "the tokenizer does not belong to this text encoder")
    dims = tuple(int(t.shape[1]) for t in tables)
    d = sum(dims)
    p_eff = effective_p(p, len(kept), d)
    if p_eff < p:
        log.info("[facecond] Celeb basis: p=%d capped to %d (%d names, d=%d)", p, p_eff, len(kept), d)
    means, bases, scales = [], [], []
    for k in range(2):
        c = gather_rows(tables, ids[:, k]).double()  # (m, d)
        mu = c.mean(0)
        _, _, vh = torch.linalg.svd(c - mu, full_matrices=False)  # rows of vh: principal directions
        b = vh[:p_eff]  # (p, d)
        alpha = (c - mu) @ b.T  # (m, p)
        means.append(mu)
        bases.append(b)
        scales.append(alpha.norm(dim=1).mean())
    return CelebBasis(mean=torch.stack(means).float(), basis=torch.stack(bases).float(),
                      scale=torch.stack(scales).float(), names=tuple(kept),
                      table_hash=t_hash or table_hash(tables), names_hash=names_hash(names),
                      dims=dims if len(dims) > 1 else ())


def cached_basis(table: Tables, names: Sequence[str], tokenize: Callable[[str], list[int]],
                 p: int = DEFAULT_P) -> CelebBasis:
    """``build_basis`` memoised per (embedding-table hash, names hash, p): one PCA per model and list."""
    t_hash = table_hash(table)
    key = (t_hash, names_hash(names), int(p))
    if key not in _CACHE:
        if len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = build_basis(table, names, tokenize, p, t_hash=t_hash)
    return _CACHE[key]
