"""pytest plugin: collect the repository root as a plain directory, not a Python package.

The root holds the pack's ``__init__.py`` (ComfyUI imports the folder as a package). pytest would import it as a
package named after the folder, which fails for the usual clone names (``ComfyUI-facecond``, ``facecond-main``:
not Python identifiers). The tests import the pack themselves, as ``facecond`` (tests/conftest.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def pytest_collect_directory(path: Path, parent):
    if path.resolve() == ROOT:
        return pytest.Dir.from_parent(parent, path=path)
    return None
