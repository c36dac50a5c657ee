"""Every Celeb Basis and face-TI example workflow, end to end through the headless server on the tiny checkpoint.

What the test changes, and why: the workflows embed faces with FaceNet VGGFace2 (512-d), whose weights are
downloaded at first use, and this machine is offline; as for Face0, FaceEmbed is switched to the real
insightface test-pack recogniser (128-d, ``host.use_stand_ins``). The trainers are in the graphs, so the MLP /
TI vectors the graph uses are the ones trained on those 128-d embeddings in the same run. Training and sampling
steps and the image size are cut to keep the suite fast. The two-identities photo is two real photos of two
different people side by side. Everything else (MTCNN detection, the graph, the widget values) runs as shipped.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from PIL import Image

from facecond_dev import host

EXPECTED_IMAGES = {"celebbasis_one_photo.json": 1, "celebbasis_two_identities.json": 1, "ti_three_photos.json": 1,
                   "celebbasis_sdxl.json": 1, "ti_sdxl.json": 1}
SDXL = ("celebbasis_sdxl.json", "ti_sdxl.json")  # on the tiny SDXL checkpoint, linked as sd_xl_base_1.0.safetensors
REPORT = re.compile(r"(\d+) steps.*loss first ([-\d.naninf]+) last ([-\d.naninf]+)")
TRAINERS = ("FacecondTrainCelebBasis", "FacecondTrainFaceTI")


@pytest.fixture(scope="module")
def celeb_server(server, shared_data):
    faces = shared_data / "faces"
    a, b = Image.open(faces / "obama" / "obama.jpg").convert("RGB"), Image.open(faces / "biden" / "biden.jpg")
    h = 400
    a, b = (im.convert("RGB").resize((round(im.width * h / im.height), h)) for im in (a, b))
    pair = Image.new("RGB", (a.width + b.width, h))
    pair.paste(a, (0, 0))
    pair.paste(b, (a.width, 0))
    pair.save(Path(server.base_dir) / "input" / "celebbasis_two_people.jpg", quality=95)
    return host.stage_server(server, {"celebbasis_photo.jpg": faces / "obama" / "obama.jpg",
                                      "ti_photo_1.jpg": faces / "obama" / "obama.jpg",
                                      "ti_photo_2.jpg": faces / "obama" / "obama2.jpg",
                                      "ti_photo_3.jpg": faces / "obama" / "obama3.jpg"})


TRAINING_TIMEOUT = 1800  # seconds a prompt that trains may take on a loaded machine (measured: 330 s at load 15-30)
SDXL_QUICK = {"FacecondTrainCelebBasis": {"steps": 1}, "FacecondTrainFaceTI": {"steps": 1}, "KSampler": {"steps": 1}}


def _prompt(server, path: Path) -> dict:
    return host.quick_prompt(path, server.object_info(), server.base_dir,
                             SDXL_QUICK if path.name in SDXL else None)  # full-size CLIP-G: one step each


def _reports(prompt: dict, result) -> list[str]:
    """The trainer reports the workflow shows (PreviewAny fed by a trainer's report output)."""
    out = []
    for node_id, node in prompt.items():
        src = node["inputs"].get("source")
        if node["class_type"] == "PreviewAny" and prompt[src[0]]["class_type"] in TRAINERS:
            out.extend(result.outputs.get(node_id, {}).get("text", []))
    return out


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.family) if n in SDXL else n
                                  for n in sorted(EXPECTED_IMAGES)])
def test_example_workflow_runs(celeb_server, name):
    server = celeb_server
    if name in SDXL:
        host.link_family_checkpoint(Path(server.base_dir), "sdxl")
    prompt = _prompt(server, host.example_workflow(name))
    # every example trains: minutes on a busy 2-core machine (SDXL: full-size CLIP-G), as the training-survives tests
    result = server.run(prompt, timeout=TRAINING_TIMEOUT)
    assert result.status == "success", (result.error or {}).get("exception_message", result.error)
    images = server.output_images(result)
    assert len(images) == EXPECTED_IMAGES[name], images
    assert all(Image.open(p).size == (64, 64) for p in images)
    reports = _reports(prompt, result)
    assert len(reports) == 1, f"{name}: expected one trainer report, got {reports}"
    m = REPORT.search(reports[0])
    assert m and int(m.group(1)) == (1 if name in SDXL else 2), reports[0]
    assert all(math.isfinite(float(m.group(i))) and float(m.group(i)) > 0 for i in (2, 3)), reports[0]
    if name == "celebbasis_two_identities.json":
        assert "2 identities, 2 images" in reports[0]
    if name == "celebbasis_one_photo.json":  # SaveCelebCoeffs kept the identity
        saved = list((Path(server.base_dir) / "models" / "facecond" / "celebbasis" / "identities").glob("alice_0*"))
        assert saved, "SaveCelebCoeffs wrote nothing"
    if name == "celebbasis_sdxl.json":  # an SDXL identity: it says so
        from facecond.py.celebbasis.coeffs import load_coeffs

        saved = list((Path(server.base_dir) / "models" / "facecond" / "celebbasis" / "identities").glob("alice_sdxl_*"))
        assert saved and load_coeffs(saved[0]).facts.family == "SDXL"
    if name == "ti_sdxl.json":  # a standard SDXL embedding
        from safetensors import safe_open

        with safe_open(Path(server.base_dir) / "models" / "embeddings" / "face_ti_person_sdxl.safetensors", "pt") as f:
            assert {k: tuple(f.get_tensor(k).shape) for k in f.keys()} == {"clip_l": (2, 768), "clip_g": (2, 1280)}


def test_every_celebbasis_and_ti_example_is_tested():
    found = [f"{f}.json" for f in host.example_workflows() if f.startswith(("celebbasis_", "ti_"))]
    assert sorted(found) == sorted(EXPECTED_IMAGES)


def test_bad_pseudo_word_is_reported_and_server_keeps_serving(celeb_server):
    server = celeb_server
    prompt = _prompt(server, host.example_workflow("celebbasis_one_photo.json"))
    coeffs_id = next(k for k, n in prompt.items() if n["class_type"] == "FacecondCelebBasisCoeffs")
    prompt[coeffs_id]["inputs"]["pseudo_word"] = "alice smith"
    result = server.run(prompt)
    assert result.status == "error"
    assert result.error["node_type"] == "FacecondCelebBasisCoeffs"
    assert "pseudo_word 'alice smith' is not a pseudo-word" in result.error["exception_message"]
    assert "<alice>" in result.error["exception_message"]  # the fix
    # the same server still runs the good graph (new sampler seed: the image is made again, not cached)
    prompt[coeffs_id]["inputs"]["pseudo_word"] = "<alice>"
    sampler = next(k for k, n in prompt.items() if n["class_type"] == "KSampler")
    prompt[sampler]["inputs"]["seed"] = 7
    again = server.run(prompt)
    assert again.status == "success", again.error
    assert len(server.output_images(again)) == 1
