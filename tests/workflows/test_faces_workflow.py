"""The faces example workflow runs headless through a real ComfyUI server with the insightface test pack."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facecond_dev.host import copy_inputs, install_stand_in_models

WORKFLOW = Path(__file__).resolve().parents[2] / "example_workflows/faces_detect_embed_similarity.json"


@pytest.fixture(scope="module")
def faces_server(server, shared_data):
    install_stand_in_models(server.base_dir)
    copy_inputs(server.base_dir, {"facecond_example_face.jpg": shared_data / "faces/obama/obama.jpg",
                                  "facecond_example_face2.jpg": shared_data / "faces/obama/obama2.jpg"})
    return server


def test_example_workflow_runs(faces_server):
    result = faces_server.run_workflow(WORKFLOW)
    assert not result.error, result.error
    images = faces_server.output_images(result)
    heat = [p for p in images if "facecond_faces_similarity" in p.name]
    assert len(heat) == 1 and len(images) >= 3  # two previews + the saved heatmap
    arr = np.asarray(Image.open(heat[0]).convert("RGB"), np.float32) / 255
    h, w = arr.shape[:2]
    # a 2x2 matrix of one person: every cell red/yellow (positive), the off-diagonal clearly similar
    off = arr[h // 4 - 2:h // 4 + 2, 3 * w // 4 - 8:3 * w // 4 - 4, 0]
    assert float(off.mean()) > 0.4


def test_bad_inputs_do_not_crash_the_server(faces_server, shared_data):
    """A NaN-free but face-less image under no_face='error' fails that prompt only; the server keeps serving."""
    Image.fromarray(np.full((32, 32, 3), 127, np.uint8)).save(faces_server.base_dir / "input/facecond_blank.png")
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "facecond_blank.png"}},
        "2": {"class_type": "FacecondFaceDetectCrop", "inputs": {
            "image": ["1", 0], "detector": "mtcnn", "select": "largest", "face_index": 0, "min_size": 40,
            "margin_scale": 1.0, "upright": "off", "no_face": "error"}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 1]}},
    }
    bad = faces_server.run(prompt)
    assert bad.error and "no face found in image 0 of 1" in str(bad.error)
    prompt["2"]["inputs"]["no_face"] = "passthrough"
    ok = faces_server.run(prompt)
    assert not ok.error, ok.error
