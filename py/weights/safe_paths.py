"""One rule for file names that come from a graph: they stay inside the folder they belong to.

A widget that names a file to write (``save_name``, ``filename_prefix``) or read is joined under one root
folder (ComfyUI's output folder, a model folder). Refused: an empty name, an absolute path or a drive
(``/etc/x``, ``C:\\x``, ``\\\\server\\x``), any ``..`` part, NUL and other control characters, a part longer
than file systems allow, and a name that would still leave the root after joining. The node side
(``nodes/paths.py``) adds the node, the input and the allowed folder to the message.
"""

from __future__ import annotations

import os
from pathlib import PureWindowsPath

MAX_PART_BYTES = 200   # per path part, in UTF-8 bytes: leaves room for "_00001_.state.safetensors" under 255
MAX_NAME_CHARS = 1000  # the whole relative name


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
