"""The faces example workflow runs headless through a real ComfyUI server with the insightface test pack."""


import numpy as np
import pytest
from PIL import Image

from facecond_dev import host
from facecond_dev.host import copy_inputs, install_stand_in_models, quick_prompt

WORKFLOW = host.example_workflow("faces_detect_embed_similarity.json")  # the variant for the ComfyUI under test


@pytest.fixture(scope="module")
def faces_server(server, shared_data):
    install_stand_in_models(server.base_dir)
    copy_inputs(server.base_dir, {"facecond_example_face.jpg": shared_data / "faces/obama/obama.jpg",
                                  "facecond_example_face2.jpg": shared_data / "faces/obama/obama2.jpg"})
    return server


def _heat_cell(server, result) -> float:
    """Red level of the 1x1 heatmap (photo A vs photo B) at a corner of the cell, clear of its label."""
    heat = [p for p in server.output_images(result) if "facecond_faces_similarity" in p.name]
    assert len(heat) == 1
    arr = np.asarray(Image.open(heat[0]).convert("RGB"), np.float32) / 255
    return float(arr[4:12, 4:12, 0].mean())  # red = max(cosine, 0)


def test_example_workflow_runs(faces_server, shared_data):
    result = faces_server.run_workflow(WORKFLOW)
    assert not result.error, result.error
    assert len(faces_server.output_images(result)) == 3  # two previews + the saved heatmap
    same = _heat_cell(faces_server, result)
    assert same > 0.5  # obama vs obama2: the test pack gives about 0.75
    # photo B of another person (and a very different shape: 970x2204): detected on its own, clearly dissimilar
    copy_inputs(faces_server.base_dir, {"facecond_example_other.jpg": shared_data / "faces/biden/biden.jpg"})
    prompt = quick_prompt(WORKFLOW, faces_server.object_info(), faces_server.base_dir)
    photo_b = [k for k, n in prompt.items() if n["inputs"].get("image") == "facecond_example_face2.jpg"]
    prompt[photo_b[0]]["inputs"]["image"] = "facecond_example_other.jpg"
    other = faces_server.run(prompt)
    assert not other.error, other.error
    assert _heat_cell(faces_server, other) < 0.25 < same


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


def test_model_list_answers_while_the_executor_loads(faces_server):
    """GET /facecond/models from another client while prompts load and unload the pack's models: every answer is a
    complete list (it failed with 'OrderedDict mutated during iteration'), and the server's models end up listed."""
    import json
    import urllib.request

    faces_server._request("/free", {"unload_models": True, "free_memory": True})  # start with nothing loaded
    ids = [faces_server.queue(quick_prompt(WORKFLOW, faces_server.object_info(), faces_server.base_dir))
           for _ in range(2)]
    answers = 0
    while faces_server._request(f"/history/{ids[-1]}").get(ids[-1]) is None:
        with urllib.request.urlopen(faces_server.url + "/facecond/models", timeout=300) as r:
            assert r.status == 200
            models = json.loads(r.read())["models"]
        assert all({"kind", "file", "device", "bytes"} <= set(m) for m in models)
        answers += 1
    for pid in ids:
        assert not faces_server.wait(pid).error
    kinds = {m["kind"] for m in faces_server._request("/facecond/models")["models"]}
    assert answers > 0 and kinds, kinds
