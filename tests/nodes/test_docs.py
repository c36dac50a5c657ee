"""docs/NODES.md is generated from the node classes; it must match them."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_nodes_doc_is_current():
    spec = importlib.util.spec_from_file_location("gen_nodes_doc", ROOT / "scripts" / "gen_nodes_doc.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    expected = gen.current_doc()
    actual = (ROOT / "docs" / "NODES.md").read_text() if (ROOT / "docs" / "NODES.md").exists() else ""
    assert actual == expected, "docs/NODES.md is out of date: run .host/venv/bin/python -P scripts/gen_nodes_doc.py"
