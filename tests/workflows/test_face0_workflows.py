"""Every Face0 example workflow, end to end through the headless server on the tiny checkpoint.

What the test changes, and why: the workflows use Face0's embedder (FaceNet VGGFace2, 512-d), whose weights
are downloaded at first use, and this machine is offline. So, as the demo does, the FaceEmbed nodes are
switched to the real insightface test-pack recogniser (128-d) from ../shared/data and the Face0 projection is
an untrained stand-in for that embedder (``host.install_stand_in_models``). Steps and image size are cut to
keep the suite fast. Everything else (MTCNN detection of real photos, the graph, the widget values) runs as shipped.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from facecond.py.face0.projection import ProjectionInfo, random_projection, save_projection
from facecond_dev import host

EXPECTED_IMAGES = {"face0_single_photo.json": 1, "face0_interpolate_two_photos.json": 5,
                   "face0_random_character.json": 4, "face0_style_vs_photo.json": 2}


@pytest.fixture(scope="module")
def face0_server(server, shared_data):
    faces = shared_data / "faces"
    return host.stage_server(server, {"face0_photo.jpg": faces / "obama" / "obama.jpg",
                                      "face0_photo_b.jpg": faces / "biden" / "biden.jpg",
                                      "face0_photo_c.png": faces / "astronaut" / "astronaut.png",
                                      "face0_photo_d.jpg": faces / "johns" / "John_Salley" / "000179_02159509.jpg"})


def _prompt(server, path: Path) -> dict:
    return host.quick_prompt(path, server.object_info(), server.base_dir)


@pytest.mark.parametrize("name", sorted(EXPECTED_IMAGES))
def test_example_workflow_runs(face0_server, name):
    server = face0_server
    result = server.run(_prompt(server, host.example_workflow(name)))
    assert result.status == "success", (result.error or {}).get("exception_message", result.error)
    images = server.output_images(result)
    assert len(images) == EXPECTED_IMAGES[name], images
    pixels = [Image.open(p).convert("RGB").tobytes() for p in images]
    assert len(set(pixels)) == len(pixels), "every image of a workflow should differ (other face/prompt/mode)"
    if name == "face0_random_character.json":  # the character was kept as a file for LoadFaceEmbeds
        saved = list((Path(server.base_dir) / "models" / "facecond" / "embeds").glob("character_*.safetensors"))
        assert saved, "SaveFaceEmbeds wrote nothing"


def test_every_face0_example_is_tested():
    """The SDXL ones run in test_family_workflows.py (marker family)."""
    assert sorted(f"{f}.json" for f in host.example_workflows() if f.startswith("face0_")) == \
        sorted([*EXPECTED_IMAGES, "face0_single_photo_sdxl.json"])


def test_bad_embedding_width_is_reported_by_name(face0_server):
    """A projection for another embedder: the server reports ProjectToContext's error with the fix."""
    server = face0_server
    prompt = _prompt(server, host.example_workflow("face0_single_photo.json"))  # FaceEmbed: the 128-d stand-in
    proj_dir = Path(server.base_dir) / "models" / "facecond" / "face0"
    save_projection(random_projection(ProjectionInfo(embedder="facenet-vggface2/bottleneck", embed_dim=512)),
                    proj_dir / "face0_sd15_facenet.safetensors")
    for node in prompt.values():
        if node["class_type"] == "FacecondLoadFace0Projection":
            node["inputs"]["projection_name"] = "face0_sd15_facenet.safetensors"
    result = server.run(prompt)
    assert result.status == "error"
    assert result.error["node_type"] == "FacecondProjectToContext"
    assert "input 'face_embeds' holds 128-d embeddings" in result.error["exception_message"]
    assert "takes 512-d embeddings" in result.error["exception_message"]
