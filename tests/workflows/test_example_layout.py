"""Example layouts as a user sees them, and the warning on files made for the other ComfyUI range.

In the real front end (headless Chromium driven by playwright, as scripts/screenshot_workflow.py drives it;
``facecond_dev/layout_check.py``): every example of this host's range loads with no missing node type, no node is
drawn bigger than it was saved (so the saved rectangles are the drawn ones) and no two nodes overlap, title bars
included. Opt-in (``FACECOND_BROWSER_TESTS=1``: about 2-4 min per host on 2 cores, over the CI budget), and skipped
where Chromium (Debian's ``chromium``) or the ``playwright`` package is missing. Always: the saved rectangles
(title bar included) of every example file must not overlap (the browser check keeps them the drawn ones).
"""

from __future__ import annotations

import json
import os
from itertools import combinations

import pytest

from facecond_dev import host

ALL_FILES = sorted(host.EXAMPLES_DIR.glob("*.json"))
TITLE = 30  # LiteGraph.NODE_TITLE_HEIGHT: the title bar is drawn above pos


def _rect(node: dict) -> tuple[float, float, float, float]:
    x, y = node["pos"]
    w, h = node["size"]
    return x, y - TITLE, x + w, y + h


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: p.stem)
def test_saved_node_rectangles_do_not_overlap(path):
    nodes = json.loads(path.read_text())["nodes"]
    overlaps = []
    for a, b in combinations(nodes, 2):
        ra, rb = _rect(a), _rect(b)
        ox = min(ra[2], rb[2]) - max(ra[0], rb[0])
        oy = min(ra[3], rb[3]) - max(ra[1], rb[1])
        if ox > 2 and oy > 2:
            overlaps.append(f"#{a['id']} {a['type']} / #{b['id']} {b['type']} ({ox:.0f}x{oy:.0f})")
    assert overlaps == []


def test_every_variant_pair_says_which_comfyui_it_is_for():
    for variant in sorted(host.EXAMPLES_DIR.glob("*_comfyui-0.3.json")):
        plain = variant.with_name(variant.name.replace("_comfyui-0.3", ""))
        for path, other in ((variant, plain), (plain, variant)):
            nodes = json.loads(path.read_text())["nodes"]
            top = min(nodes, key=lambda n: n["pos"][1])
            assert top["type"] == "Note", f"{path.name}: the top node is {top['type']}"
            text = top["widgets_values"][0]
            assert text.startswith("⚠ For ") and other.name in text, (path.name, text)


def test_layout_in_the_real_front_end():
    from facecond_dev import layout_check

    if os.environ.get("FACECOND_BROWSER_TESTS", "") in ("", "0"):
        pytest.skip("opt-in: FACECOND_BROWSER_TESTS=1 (needs Chromium and playwright)")
    missing = layout_check.available()
    if missing:
        pytest.skip(missing)
    found = layout_check.check(sorted(host.example_workflows().values()))
    problems = [f"{name}: {kind}: {line}" for name, f in found.items() for kind in ("missing", "small", "overlaps")
                for line in f[kind]]
    assert len(found) == len(host.example_workflows())
    assert problems == []
