"""FacecondFetchWeights (nodes/weights/fetch.py) in-process: a manifest weight found, verified and reported."""

from __future__ import annotations

from pathlib import Path

import pytest

from facecond.nodes.weights.fetch import FacecondFetchWeights


def test_fetch_weights_node_reports_path_and_status():
    pytest.importorskip("facenet_pytorch")
    import facecond

    assert facecond.NODE_CLASS_MAPPINGS["FacecondFetchWeights"] is FacecondFetchWeights
    inputs = FacecondFetchWeights.INPUT_TYPES()["required"]
    assert "buffalo_l" in inputs["weight"][0] and all("tooltip" in opts for _, opts in inputs.values())
    out = FacecondFetchWeights().fetch("mtcnn_pnet", allow_download=False)
    path, status = out["result"]
    assert Path(path).name == "pnet.pt" and "verified" in status and out["ui"]["text"] == [status]
