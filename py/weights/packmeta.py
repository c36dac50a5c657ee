"""Pack-file metadata and modules, checked before anything is allocated (see ``packfile``'s reader): bounded numbers
(``meta_int``), JSON values (``meta_json``) and ids (``meta_text``) from a file's metadata; meta-device stand-ins
for a header's tensors (``meta_tensors``); a module built on the meta device, compared, then given the checked
tensors (``build``). Every refusal is a ``PackFileError`` with the value quoted clipped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import TypeVar

from .packfile import MAX_QUOTE, clip, metadata_error, shape_error

T = TypeVar("T")


def meta_int(path: str | os.PathLike, meta: dict[str, str], key: str, lo: int, hi: int, *, default: int | None = None,
             kind: str | None = None, label: str | None = None, writer: str | None = None) -> int:
    """The metadata number ``key`` as an int within [lo, hi] (``default`` when absent, if given); else a
    "bad_metadata" ``PackFileError`` quoting the value (clipped) and the bounds."""
    raw = meta.get(key)
    if raw is None and default is not None:
        return default
    text = raw.strip() if isinstance(raw, str) else ""
    value = int(text) if len(text) <= 12 and text.lstrip("+-").isdigit() and text.lstrip("+-").isascii() else None
    if value is None or not lo <= value <= hi:
        found = "absent" if raw is None else clip(repr(raw), 80)
        raise metadata_error(path, f"{key!r} must be a whole number from {lo} to {hi}", kind=kind, label=label,
                             writer=writer, found=found)
    return value


def meta_json(path: str | os.PathLike, meta: dict[str, str], key: str, check: Callable[[object], bool], want: str, *,
              kind: str | None = None, label: str | None = None, writer: str | None = None):
    """The metadata value ``key`` parsed as JSON and accepted by ``check``; else "bad_metadata" saying ``want``."""
    raw = meta.get(key)
    try:
        value = json.loads(raw) if isinstance(raw, str) else None
        ok = raw is not None and check(value)
    except (ValueError, TypeError, RecursionError):
        ok = False
    if not ok:
        found = "absent" if raw is None else clip(repr(raw), 80)
        raise metadata_error(path, f"{key!r} must be {want}", kind=kind, label=label, writer=writer, found=found)
    return value


def meta_text(path: str | os.PathLike, meta: dict[str, str], key: str, *, default: str | None = None,
              limit: int = MAX_QUOTE, kind: str | None = None, label: str | None = None,
              writer: str | None = None) -> str:
    """The metadata string ``key`` (an id: embedder, model, hash) of at most ``limit`` characters."""
    raw = meta.get(key, default)
    if raw is None or len(raw) > limit:
        found = "absent" if raw is None else f"{len(raw):,} characters: {clip(repr(raw), 60)}"
        raise metadata_error(path, f"{key!r} must be a text of at most {limit} characters", kind=kind, label=label,
                             writer=writer, found=found)
    return raw


def meta_tensors(specs: dict[str, tuple[str, tuple[int, ...]]]) -> dict:
    """Stand-ins on the meta device (shape and dtype, no storage) for a header's tensors: what ``build`` and the
    loaders check before a byte of tensor data is read."""
    import torch

    to_torch = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool}
    return {k: torch.empty(shape, dtype=to_torch.get(dt, torch.uint8), device="meta") for k, (dt, shape) in
            specs.items()}


def build(path: str | os.PathLike, factory: Callable[[], T], state: dict, *, what: str, kind: str | None = None,
          label: str | None = None, writer: str | None = None, dtype=None) -> T:
    """``factory()`` built on the meta device (no memory), its tensor names and shapes compared with ``state``'s,
    then ``state`` assigned (float tensors as ``dtype``, float32 by default). With meta stand-ins
    (``meta_tensors``) this is the check alone. A mismatch is a "wrong_shape" ``PackFileError`` listing only the
    tensors that differ."""
    import torch

    try:
        with torch.device("meta"):
            module = factory()
    except (IndexError, KeyError, ValueError, TypeError, RuntimeError, ZeroDivisionError) as e:
        raise shape_error(path, "tensors that make one module", f"{type(e).__name__}: {clip(e)}", kind=kind,
                          label=label, writer=writer, what=what) from None
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if expected != found:
        raise shape_error(path, {k: v for k, v in expected.items() if found.get(k) != v},
                          {k: v for k, v in found.items() if expected.get(k) != v}, kind=kind, label=label,
                          writer=writer, what=what)
    # copies: each parameter in its own, freshly allocated storage (as load_state_dict without assign gives)
    dtype = torch.float32 if dtype is None else dtype
    module.load_state_dict({k: v.to(dtype, copy=True) if v.is_floating_point() else v.clone()
                           for k, v in state.items()}, assign=True)
    return module
