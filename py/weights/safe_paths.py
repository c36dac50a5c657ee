"""One rule for file names that come from a graph: they stay inside the folder they belong to.

A widget that names a file to write (``save_name``, ``filename_prefix``) or read is joined under one root
folder (ComfyUI's output folder, a model folder). Refused: an empty name, an absolute path or a drive
(``/etc/x``, ``C:\\x``, ``\\\\server\\x``), any ``..`` part, NUL and other control characters, a part longer
than file systems allow, and a name that would still leave the root after joining. The node side
(``nodes/paths.py``) adds the node, the input and the allowed folder to the message.

Names of files to *write* must also be valid on Windows, where most ComfyUI users are (``windows_problem``): no
reserved device name (CON, PRN, AUX, NUL, COM1-9, LPT1-9, with or without an extension, any case), none of
``< > : " | ? *``, no part ending in a dot or a space. ``windows_alternative`` proposes a name that passes.
ComfyUI's ``%date:yyyy-MM-dd%`` is expanded by the browser only for ComfyUI's own save nodes (a list in the
front end), so it reaches our nodes as typed and its ``:`` is refused; ``%year%-%month%-%day%``, which the server
expands in ``folder_paths.get_save_image_path``, is offered instead for a ``filename_prefix``.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import PureWindowsPath

MAX_PART_BYTES = 200   # per path part, in UTF-8 bytes: leaves room for "_00001_.state.safetensors" under 255
MAX_NAME_CHARS = 1000  # the whole relative name
WINDOWS_RESERVED = frozenset({"CON", "PRN", "AUX", "NUL", *(f"{d}{i}" for d in ("COM", "LPT") for i in "123456789¹²³")})
WINDOWS_BAD_CHARS = '<>:"|?*'
_DATE_TOKEN = re.compile(r"%date:([^%]*)%")
# the front end's %date:FORMAT% fields -> (the server's get_save_image_path variable, strftime), longest first
_DATE_FIELDS = (("yyyy", "%year%", "%Y"), ("MM", "%month%", "%m"), ("dd", "%day%", "%d"), ("hh", "%hour%", "%H"),
                ("HH", "%hour%", "%H"), ("mm", "%minute%", "%M"), ("ss", "%second%", "%S"))


class PathRuleError(ValueError):
    """A file name from a graph breaks the rule; ``reason`` says how (without node or input)."""

    def __init__(self, name: str, reason: str):
        self.name, self.reason = name, reason
        super().__init__(f"{_shown(name)} {reason}")


def _shown(name: str) -> str:
    return repr(name if len(name) <= 80 else name[:60] + "..." + name[-12:])


def name_problem(name: str) -> str | None:
    """Why ``name`` is not a plain relative file name, or None when it is."""
    if not isinstance(name, str) or not name.strip():
        return "is empty"
    if len(name) > MAX_NAME_CHARS:
        return f"is {len(name)} characters long (at most {MAX_NAME_CHARS})"
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        return "contains a NUL or another control character"
    win = PureWindowsPath(name)
    if name.startswith(("/", "\\")) or os.path.isabs(name) or win.drive or win.root:
        return "is an absolute path"
    parts = [p for p in name.replace("\\", "/").split("/") if p]
    if any(p == ".." for p in parts):
        return "contains '..' (a step out of the folder)"
    for p in parts:
        if len(p.encode("utf-8")) > MAX_PART_BYTES:
            return f"has a part of {len(p.encode('utf-8'))} bytes (at most {MAX_PART_BYTES})"
    return None


def _parts(name: str) -> list[str]:
    return [p for p in name.replace("\\", "/").split("/") if p and p != "."]


def _reserved(part: str) -> bool:
    return part.split(".", 1)[0].rstrip(" ").upper() in WINDOWS_RESERVED


def windows_problem(name: str) -> str | None:
    """Why Windows cannot create ``name`` (a relative name that passed ``name_problem``), or None."""
    bad = sorted({ch for ch in name if ch in WINDOWS_BAD_CHARS}, key=WINDOWS_BAD_CHARS.index)
    if bad:
        what = " ".join(repr(ch) for ch in bad)
        if ":" in bad and _DATE_TOKEN.search(name):
            return (f"contains {what}, which Windows does not allow in file names (ComfyUI's %date:...% is only "
                    "expanded for ComfyUI's own save nodes)")
        return f"contains {what}, which Windows does not allow in file names (none of {' '.join(WINDOWS_BAD_CHARS)})"
    for part in _parts(name):
        if _reserved(part):
            return (f"uses {part!r}, a name Windows reserves for a device (CON, PRN, AUX, NUL, COM1-9, LPT1-9, "
                    "with any extension)")
        if part.endswith((".", " ")):
            end = "a dot" if part.endswith(".") else "a space"
            return f"has a part ending in {end} ({part!r}), which Windows drops"
    return None


def windows_alternative(name: str, prefix: bool = False) -> str:
    """A name close to ``name`` that ``windows_problem`` accepts: ``%date:FORMAT%`` becomes the server's
    ``%year%``... variables for a ``filename_prefix`` (``prefix``), today's date otherwise; refused characters
    become ``_``; a reserved name gets a ``_``; trailing dots and spaces go."""
    def date(m):
        fmt = m.group(1) or "yyyy-MM-dd"
        for field, var, code in _DATE_FIELDS:
            fmt = fmt.replace(field, var if prefix else time.strftime(code))
        return fmt

    name = _DATE_TOKEN.sub(date, name)
    name = "".join("_" if ch in WINDOWS_BAD_CHARS else ch for ch in name)
    out = []
    for raw in name.replace("\\", "/").split("/"):
        part = raw if raw in ("", ".") else raw.rstrip(". ") or "_"
        if _reserved(part):
            stem, dot, ext = part.partition(".")
            part = f"{stem.rstrip(' ')}_{dot}{ext}"
        out.append(part)
    return "/".join(out)


def inside(root: str | os.PathLike, path: str | os.PathLike) -> bool:
    """Whether ``path`` lies inside ``root`` once both are made absolute and normalised (links are not
    followed: a link a user put into a model folder on purpose is theirs)."""
    root_abs = os.path.normpath(os.path.abspath(root))
    path_abs = os.path.normpath(os.path.abspath(path))
    return os.path.commonpath([root_abs, path_abs]) == root_abs and path_abs != root_abs


def join_under(root: str | os.PathLike, name: str) -> str:
    """``root/name``, normalised; ``PathRuleError`` if ``name`` is not a plain relative name or leaves ``root``."""
    reason = name_problem(name)
    if reason is not None:
        raise PathRuleError(name, reason)
    path = os.path.normpath(os.path.join(os.path.abspath(root), name.replace("\\", "/")))
    if not inside(root, path):
        raise PathRuleError(name, "does not name a file inside the folder")
    return path
