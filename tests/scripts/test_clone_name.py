"""The suite runs whatever the clone's folder is called (ComfyUI packs are usually cloned as ``ComfyUI-<name>``).

pytest would import the root ``__init__.py`` as a package named after the folder; the plugin in
``scripts/facecond_dev/pytest_root.py`` makes it collect the root as a plain folder instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_suite_runs_from_a_folder_name_that_is_not_an_identifier(tmp_path):
    # a real copy (pytest resolves symlinks, so a linked folder would keep the original name); the host stays linked
    clone = tmp_path / "ComfyUI-facecond.main"
    skip = shutil.ignore_patterns(".git", ".host", ".gpu-host", "demo_output", "__pycache__")
    shutil.copytree(ROOT, clone, symlinks=True, ignore=skip)
    host = ROOT / ".host"
    if host.exists():
        (clone / ".host").symlink_to(host.resolve(), target_is_directory=True)
    proc = subprocess.run([sys.executable, "-P", "-m", "pytest", "-q", "tests/py/faces/test_align.py"],
                          check=False, cwd=clone, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ))
    tail = (proc.stdout + proc.stderr)[-2000:]
    assert proc.returncode == 0, tail
    assert " passed" in tail and "error" not in tail.lower(), tail
