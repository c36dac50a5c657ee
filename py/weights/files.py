"""The pack's own safetensors files (projections, embeddings, coefficient MLPs, identities, caches) say what they
hold in the metadata key ``facecond.kind``; ``require_kind`` is the one check of it."""

from __future__ import annotations

KIND_KEY = "facecond.kind"


def require_kind(meta: dict[str, str] | None, kind: str, where: str, what: str) -> dict[str, str]:
    """``meta`` (a safetensors header's metadata; None counts as empty) if its ``facecond.kind`` is ``kind``;
    else ValueError "<where>: not a <what> file (metadata facecond.kind=<found>, expected <kind>)"."""
    meta = meta or {}
    if meta.get(KIND_KEY) != kind:
        raise ValueError(f"{where}: not a {what} file (metadata {KIND_KEY}={meta.get(KIND_KEY)!r}, expected "
                         f"{kind!r}). Pick a file the pack wrote for this input.")
    return meta
