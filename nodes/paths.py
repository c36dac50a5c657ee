"""The node side of bad-input handling: file names kept inside ComfyUI's folders, pack files loaded with one
kind of error, and float widgets that refuse NaN/inf at validation.

- ``write_path`` / ``check_write_name``: a widget naming a file to write resolves inside its folder (ComfyUI's
  output folder or a model folder); absolute paths, ``..``, NUL, overlong names and names Windows cannot create
  (CON, NUL..., ``< > : " | ? *``, a trailing dot or space) are refused with the node, the input, the reason and
  a valid alternative; so is a name whose folder would have to replace an existing file (the pure rule is
  ``py/weights/safe_paths.py``). ``write_dir``: the same for a folder to write into.
- ``load_file``: a file picked in a widget, read by one of the pack's loaders; every failure (missing, empty,
  truncated, not safetensors, a pickle, wrong kind, wrong shape: ``py/weights/packfile.py``) comes back as one
  ``ValueError`` naming the node, the input, the file and the fix.
- ``finite_floats``: the body of a V1 ``VALIDATE_INPUTS``. ComfyUI skips its own min/max check for every
  input that VALIDATE_INPUTS names, so this redoes it from INPUT_TYPES, and adds the NaN/inf check ComfyUI
  lacks (NaN compares false with both bounds). Linked inputs arrive as None and are checked at run time.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import TypeVar

import folder_paths

from ..py.weights.manifest import WeightsError
from ..py.weights.packfile import PackFileError, clip, out_of_memory
from ..py.weights.safe_paths import inside, join_under, name_problem, windows_alternative, windows_problem

T = TypeVar("T")


def folder_root(folder: str) -> str:
    """The directory a write into ``folder`` goes to: ComfyUI's output/temp folder, or the first path of a
    registered model folder (the one ComfyUI itself writes downloads to)."""
    if folder == "output":
        return folder_paths.get_output_directory()
    if folder == "temp":
        return folder_paths.get_temp_directory()
    if folder == "input":
        return folder_paths.get_input_directory()
    return folder_paths.get_folder_paths(folder)[0]


def _shown(name: str) -> str:
    return repr(name if len(name) <= 80 else name[:60] + "..." + name[-12:])


def write_path(node: str, input_name: str, name: str, folder: str, suffix: str = "", prefix: bool = False) -> str:
    """Absolute path of ``name + suffix`` inside ``folder``'s root; ValueError naming node, input and folder.
    ``prefix``: ``name`` is a ComfyUI filename_prefix (the alternative offered for ``%date:...%`` uses the
    variables ``get_save_image_path`` expands)."""
    root = folder_root(folder)
    reason = name_problem(name)
    if reason is None:
        try:
            path = join_under(root, name + suffix)
        except ValueError as e:
            reason = getattr(e, "reason", str(e))
    if reason is not None:
        raise ValueError(f"{node}: {input_name} {_shown(name)} {reason}. Files are only written inside {root}: give "
                         "a plain relative name such as 'person' or 'subfolder/person'.")
    reason = windows_problem(name + suffix)
    if reason is not None:
        raise ValueError(f"{node}: {input_name} {_shown(name)} {reason}. Use a name that works on every system, "
                         f"e.g. {windows_alternative(name, prefix)!r}.")
    parent = os.path.dirname(path)
    while inside(root, parent):  # a folder on the way that is a file: os.makedirs would say "[Errno 17]/[20]"
        if os.path.exists(parent) and not os.path.isdir(parent):
            raise ValueError(f"{node}: {input_name} {_shown(name)} needs the folder {parent}, but a file has that "
                             "name. Give another name, or move that file away.")
        parent = os.path.dirname(parent)
    return path


def write_dir(node: str, input_name: str, name: str, folder: str = "output") -> str:
    """Absolute path of the folder ``name`` inside ``folder``'s root, to write files into: ``write_path``'s rule,
    and not the name of an existing file."""
    path = write_path(node, input_name, name, folder)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{node}: {input_name} {_shown(name)} names the file {path}, not a folder: files are "
                         f"written into a folder of that name. Give another name (e.g. {name.rstrip('/')+'_set'!r}), "
                         "or move that file away.")
    return path


def check_write_name(node: str, input_name: str, name: str, folder: str) -> None:
    """The rule alone, for a filename_prefix that ComfyUI's ``get_save_image_path`` then turns into
    ``<prefix>_00001_.<ext>`` (checked as that file name)."""
    write_path(node, input_name, name, folder, "_00001_", prefix=True)


def read_path(node: str, input_name: str, folder: str, name: str) -> str:
    """Full path of ``name`` picked from ``folder``'s list; ValueError naming node, input and folder."""
    reason = name_problem(name)
    folders = folder_paths.get_folder_paths(folder) if folder in folder_paths.folder_names_and_paths else []
    if reason is not None:
        raise ValueError(f"{node}: {input_name} {name!r} {reason}. Pick a file from the list (files in {folders}).")
    path = folder_paths.get_full_path(folder, name)
    if path is None or not os.path.isfile(path):
        raise ValueError(f"{node}: {input_name} {name!r} is not in {folders}. Put the file there and refresh the "
                         "node list (press R in the canvas), or pick another file.")
    return path


def read_dir(node: str, input_name: str, name: str, folder: str = "input") -> str:
    """Full path of the existing sub-folder ``name`` of ``folder``'s root (ComfyUI's input folder by default);
    absolute paths, ``..`` and names outside the root are refused, as for writes. ValueError naming node and
    input."""
    root = folder_root(folder)
    reason = name_problem(name)
    path = None
    if reason is None:
        try:
            path = join_under(root, name.strip())
        except ValueError as e:
            reason = getattr(e, "reason", str(e))
    if reason is None and not os.path.isdir(path):
        reason = "is not a folder there"
    if reason is not None:
        raise ValueError(f"{node}: {input_name} {name!r} {reason}. Give a folder inside {root} by its relative "
                         "name, e.g. 'celeb_photos'.")
    return path


def load_file(node: str, input_name: str, folder: str, name: str, loader: Callable[[str], T]) -> T:
    """``loader(path)`` for the file ``name`` picked in ``input_name``; every failure is one ValueError with the
    node, the input, the path, what was wrong (expected vs found) and the fix."""
    path = read_path(node, input_name, folder, name)
    try:
        return loader(path)
    except (PackFileError, WeightsError) as e:  # these carry the path, the problem and the fix already
        raise ValueError(f"{node}: {input_name} {name!r}: {clip(e, 1500)}") from None
    except Exception as e:  # any other loader failure (TypeError, ZeroDivisionError ...): the same one message
        if out_of_memory(e):
            raise  # as it is: ComfyUI's executor reports it and unloads models (is_oom / OOM_EXCEPTION)
        raise ValueError(f"{node}: {input_name} {name!r} ({path}) cannot be used: {type(e).__name__}: "
                         f"{clip(e, 300)}. Pick a file of the right kind for this node.") from None


def finite_floats(cls, node: str, **values) -> bool | str:
    """True, or one message naming every float widget that is NaN/inf or outside its min/max."""
    spec = {**cls.INPUT_TYPES().get("required", {}), **cls.INPUT_TYPES().get("optional", {})}
    problems = []
    for name, value in values.items():
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue  # linked (checked when it runs) or already refused by ComfyUI's type conversion
        opts = spec[name][1] if len(spec.get(name, ())) > 1 else {}
        lo, hi = opts.get("min"), opts.get("max")
        bounds = f"between {lo} and {hi}" if lo is not None and hi is not None else "finite"
        if not math.isfinite(value):
            problems.append(f"{name} is {'NaN' if math.isnan(value) else value} (not a finite number); "
                            f"give a number {bounds}")
        elif lo is not None and value < lo:
            problems.append(f"{name} = {value} is below its minimum {lo}")
        elif hi is not None and value > hi:
            problems.append(f"{name} = {value} is above its maximum {hi}")
    return True if not problems else f"{node}: " + "; ".join(problems) + "."
