"""Example workflows in the real ComfyUI front end (headless Chromium): nodes drawn bigger than saved, and nodes
that overlap (title bars included), measured by the front end itself after it has laid each graph out.

Needs Debian's Chromium (``apt-get install chromium``: /usr/bin/chromium) and the Python ``playwright`` package
(PyPI; its driver only, never ``playwright install``) in the host's venv. ``tests/workflows/test_example_layout.py``
runs it (skipped where either is missing); by hand, ``python -P scripts/facecond_dev/layout_check.py --fix`` rewrites
the examples of the host's ComfyUI range so that nothing overlaps (``screenshot_workflow.fix_layout``).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/
import screenshot_workflow as shot

from facecond_dev import host


def available() -> str | None:
    """None when the check can run here, else what is missing."""
    if not Path(shot.CHROMIUM).exists():
        return f"no Chromium at {shot.CHROMIUM} (apt-get install chromium)"
    if importlib.util.find_spec("playwright") is None:
        return "the playwright package is not installed in this Python (pip install playwright; no browser download)"
    return None


def _photos() -> list[Path]:
    data = host.shared_data()
    if data is not None:
        return [data / "faces" / name for name in shot.SAMPLE_FACES]
    from PIL import Image
    from skimage.data import astronaut

    path = Path(tempfile.mkdtemp(prefix="facecond-layout-photo-")) / "astronaut.png"
    Image.fromarray(astronaut()).save(path)
    return [path]


def check(workflows: list[Path], *, fix: bool = False, settle_ms: int = 800) -> dict[str, dict]:
    """{file name: {"small": [...], "overlaps": [...], "missing": [...]}} as the front end draws each workflow."""
    from playwright.sync_api import sync_playwright

    base = Path(tempfile.mkdtemp(prefix="facecond-layout-"))
    profile = Path(tempfile.mkdtemp(prefix="facecond-chromium-"))
    out: dict[str, dict] = {}
    try:
        shot._prepare(base, workflows, _photos())
        with host.ComfyServer(base) as srv, sync_playwright() as pw:
            ctx = pw.chromium.launch_persistent_context(str(profile), executable_path=shot.CHROMIUM, headless=True,
                                                        args=shot.CHROMIUM_ARGS,
                                                        viewport={"width": 1600, "height": 900})
            ctx.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")
            page = ctx.pages[0] if ctx.pages else ctx.new_page()
            page.goto(srv.url, wait_until="networkidle")
            page.wait_for_function("window.app && window.app.graph && window.app.canvas && window.LiteGraph && "
                                   "Object.keys(window.LiteGraph.registered_node_types).length > 100",
                                   timeout=180_000)
            for path in workflows:
                workflow = json.loads(path.read_text())
                info = page.evaluate(shot._LOAD_JS, [workflow, path.stem])
                page.wait_for_timeout(settle_ms)  # image previews grow LoadImage nodes
                if fix and shot.fix_layout(workflow, page.evaluate(shot._SIZES_JS)):
                    path.write_text(json.dumps(workflow, indent=1, ensure_ascii=False) + "\n")
                    info = page.evaluate(shot._LOAD_JS, [workflow, path.stem])
                    page.wait_for_timeout(settle_ms)
                out[path.name] = {**page.evaluate(shot._CHECK_JS, workflow), "missing": info["missing"]}
            ctx.close()
    finally:
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(profile, ignore_errors=True)
    return out


if __name__ == "__main__":
    paths = sorted(host.example_workflows().values())
    for name, found in check(paths, fix="--fix" in sys.argv).items():
        for kind in ("missing", "small", "overlaps"):
            for line in found[kind]:
                print(f"{name}: {kind}: {line}")
