"""Fixtures of the Face0 node tests: a random projection written into the registered folder and loaded by the node."""

from __future__ import annotations

import os

import folder_paths
import pytest

from facecond.nodes.face0.projection import LoadFace0Projection
from facecond.py.face0.projection import ProjectionInfo, random_projection, save_projection

D = 128  # the test embedder's width


@pytest.fixture(scope="module")
def projection():
    # written with the pack's own save function into the registered folder, then loaded by the node
    folder = folder_paths.get_folder_paths("facecond_face0")[0]
    os.makedirs(folder, exist_ok=True)
    save_projection(random_projection(ProjectionInfo(embedder="test/embedder", embed_dim=D), seed=0),
                    os.path.join(folder, "face0_nodes_test.safetensors"))
    assert "face0_nodes_test.safetensors" in LoadFace0Projection.INPUT_TYPES()["required"]["projection_name"][0]
    return LoadFace0Projection().load("face0_nodes_test.safetensors")[0]
