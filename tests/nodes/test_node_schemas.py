"""Shipped nodes keep their IDs, widget order and output types (saved workflows depend on them).

``node_schemas.json`` records every node as shipped. A node may gain widgets or outputs at the end; it may
not lose, rename, reorder or retype them. After adding a node or appending a widget, refresh the record
with ``FACECOND_UPDATE_SCHEMAS=1 make test`` and commit it with the change.
"""

import json
import os
from pathlib import Path

import facecond
from facecond_dev.client import _widget_inputs

RECORD = Path(__file__).with_name("node_schemas.json")


def _current() -> dict:
    out = {}
    for node_id in sorted(facecond.NODE_CLASS_MAPPINGS):
        info = _node_info(node_id)
        out[node_id] = {
            "widgets": [[name, kind] for name, kind, _ in _widget_inputs(info)],
            "inputs": [name for sec in ("required", "optional") for name in info["input"].get(sec, {})],
            "outputs": list(info["output"]),
        }
    return out


def _node_info(node_id: str) -> dict:
    cls = facecond.NODE_CLASS_MAPPINGS[node_id]
    inputs = cls.INPUT_TYPES()
    return {"input": {k: v for k, v in inputs.items() if k in ("required", "optional")},
            "output": list(cls.RETURN_TYPES)}


def test_every_node_has_tooltips_and_category():
    for node_id, cls in facecond.NODE_CLASS_MAPPINGS.items():
        assert node_id.startswith("Facecond"), node_id
        assert getattr(cls, "CATEGORY", "").startswith("facecond"), node_id
        assert getattr(cls, "DESCRIPTION", ""), f"{node_id} has no DESCRIPTION"
        for sec, entries in cls.INPUT_TYPES().items():
            if sec not in ("required", "optional"):
                continue
            for name, entry in entries.items():
                opts = entry[1] if len(entry) > 1 else {}
                assert opts.get("tooltip"), f"{node_id}.{name} has no tooltip"


def test_shipped_schemas_are_only_extended():
    current = _current()
    if os.environ.get("FACECOND_UPDATE_SCHEMAS") == "1" or not RECORD.exists():
        old = json.loads(RECORD.read_text()) if RECORD.exists() else {}
        old.update(current)
        RECORD.write_text(json.dumps(old, indent=1, sort_keys=True) + "\n")
    shipped = json.loads(RECORD.read_text())
    for node_id, rec in shipped.items():
        assert node_id in current, f"shipped node {node_id} was removed or renamed (node IDs are permanent)"
        now = current[node_id]
        for key in ("widgets", "inputs", "outputs"):
            n = len(rec[key])
            assert now[key][:n] == rec[key], (
                f"{node_id}: {key} changed from {rec[key]} to {now[key][:n]}; only appending is allowed "
                "(saved workflows store widget values by position)")
    unrecorded = sorted(set(current) - set(shipped))
    assert not unrecorded, f"new nodes not in {RECORD.name}: {unrecorded}; run with FACECOND_UPDATE_SCHEMAS=1"
