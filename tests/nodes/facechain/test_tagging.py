"""FaceChain's FaceChainTagFaces node (nodes/facechain/tagging.py) in-process on real photos (../shared/data/faces):
trigger word from gender and age, captions, the dataset folder."""

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from facecond.nodes.facechain.chain import FacecondFaceChainPreprocess
from facecond_dev.face_photos import REC, detect_faces, image_batch, letterbox, photo_array

pytestmark = pytest.mark.usefixtures("one_torch_thread", "stand_in_models")


@pytest.fixture(scope="module")
def genderage_packs(stand_in_models):
    """Two stand-in genderage models in the in-process base: a man of 34.6 and a girl of 8 (constant outputs)."""
    from facecond_dev.onnx_standins import genderage_model

    root = stand_in_models / "models/insightface/models"
    genderage_model(root / "ga_man/genderage.onnx", 0.2, 0.8, 34.6)
    genderage_model(root / "ga_girl/genderage.onnx", 0.7, 0.3, 8.0)
    return root


def _tag_inputs(shared_data):
    photos = [letterbox(photo_array(shared_data, "obama/obama.jpg"), 320), np.full((320, 320, 3), 0.5, np.float32),
              letterbox(photo_array(shared_data, "biden/biden.jpg"), 320)]
    image = image_batch(photos)
    faces = detect_faces(image)
    crops, _, _ = FacecondFaceChainPreprocess().prepare(image, faces, 64, 2.0, "ellipse", "keep")
    return image, faces, crops


def test_tag_faces_captions_dataset_and_steps(shared_data, genderage_packs):
    import json

    import folder_paths

    from facecond.nodes.facechain.tagging import AUTO, FacecondFaceChainTagFaces

    choices = FacecondFaceChainTagFaces.INPUT_TYPES()["required"]["genderage_model"][0]
    assert {"ga_man/genderage.onnx", "ga_girl/genderage.onnx", "buffalo_l/genderage.onnx"} <= set(choices)
    image, faces, crops = _tag_inputs(shared_data)
    assert crops.shape[0] == 2  # the grey photo has no face
    out = Path(folder_paths.get_output_directory()) / "facechain_test/person"
    out.mkdir(parents=True, exist_ok=True)
    (out / "0007.png").write_bytes(b"stale")  # from an earlier, larger set: removed
    (out / "notes.txt").write_text("mine")  # not a dataset name: kept
    before = crops.clone()
    # overwrite off (the default): the non-empty folder is kept and the set goes to the next numbered name
    kept = Path(folder_paths.get_output_directory()) / "facechain_test/person_00001"
    shutil.rmtree(kept, ignore_errors=True)
    *_, report = FacecondFaceChainTagFaces().tag(
        crops, image, faces, "ga_man/genderage.onnx", AUTO, "sks", "facechain_test/person", 20, 1)
    assert sorted(p.name for p in out.iterdir()) == ["0007.png", "notes.txt"] and str(kept) in report
    assert sorted(p.name for p in kept.iterdir()) == ["0000.png", "0000.txt", "0001.png", "0001.txt",
                                                      "metadata.jsonl"]
    # overwrite on: written into the folder, replacing its NNNN files and metadata
    captions, prompt, steps, report = FacecondFaceChainTagFaces().tag(
        crops, image, faces, "ga_man/genderage.onnx", AUTO, "sks", "facechain_test/person", 20, 1, overwrite=True)
    # p_male 0.8 > p_female 0.2 for both faces; age round(34.6) = 35 -> bin 30-39 -> FaceChain's 'a handsome man'
    assert captions == ["sks, a handsome man"] * 2 and prompt == "sks, a handsome man"
    assert steps == 40  # 2 photos x 20 epochs at batch 1
    # row 1 is the grey photo's passthrough stand-in
    assert "face 0 (photo 0): male, age 35" in report and "face 2 (photo 2): male, age 35" in report
    assert sorted(p.name for p in out.iterdir()) == ["0000.png", "0000.txt", "0001.png", "0001.txt",
                                                     "metadata.jsonl", "notes.txt"]
    assert (out / "0001.txt").read_text() == "sks, a handsome man"
    png = np.asarray(Image.open(out / "0001.png"), np.float32) / 255
    assert png.shape == (64, 64, 3) and np.abs(png - crops[1].numpy()).max() <= 1 / 255 + 1e-6
    meta = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert meta == [{"file_name": "0000.png", "text": "sks, a handsome man"},
                    {"file_name": "0001.png", "text": "sks, a handsome man"}]
    assert torch.equal(crops, before)
    # a girl of 8: 'a girl' plus FaceChain's 'children' tag; 3 epochs at batch 4 -> ceil(6 / 4) = 2 steps
    captions, prompt, steps, _ = FacecondFaceChainTagFaces().tag(
        crops, image, faces, "ga_girl/genderage.onnx", AUTO, "<sks>", "", 3, 4)
    assert captions == ["<sks>, a girl, children"] * 2 and steps == 2


def test_tag_faces_by_hand_and_bad_inputs(shared_data, genderage_packs, monkeypatch):
    from facecond.nodes.facechain.tagging import AUTO, FacecondFaceChainTagFaces

    image, faces, crops = _tag_inputs(shared_data)
    node = FacecondFaceChainTagFaces()
    # a word picked by hand needs no model (the published entry is not installed here)
    captions, _, _, report = node.tag(crops, image, faces, "buffalo_l/genderage.onnx", "a mature woman", "sks",
                                           "", 20, 1)
    assert captions == ["sks, a mature woman"] * 2 and "set by hand" in report
    monkeypatch.setenv("FACECOND_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"FaceChainTagFaces: genderage_model 'buffalo_l/genderage.onnx' is not "
                                         r"installed .*models/insightface/models/buffalo_l/"):
        node.tag(crops, image, faces, "buffalo_l/genderage.onnx", AUTO, "sks", "", 20, 1)
    with pytest.raises(ValueError, match=r"is a recognition model, not insightface's genderage"):
        node.tag(crops, image, faces, REC, AUTO, "sks", "", 20, 1)
    with pytest.raises(ValueError, match="'images' holds 1 image"):
        node.tag(crops[:1], image, faces, "ga_man/genderage.onnx", AUTO, "sks", "", 20, 1)
    with pytest.raises(ValueError, match=r"FaceChainTagFaces: dataset_name '\.\./escape'"):
        node.tag(crops, image, faces, "ga_man/genderage.onnx", AUTO, "sks", "../escape", 20, 1)


def test_tag_faces_reads_a_sideways_face_upright(shared_data, stand_in_models):
    """A photo turned on its side gives (nearly) the numbers of the upright photo: FaceDetectCrop finds the face
    by turning the photo, and the genderage crop is turned upright by the quarter turn of the aligned crop. The
    stand-in model's output depends on every input pixel (random weights)."""
    from facecond.nodes.facechain.tagging import AUTO, FacecondFaceChainTagFaces
    from facecond_dev.onnx_standins import genderage_model

    genderage_model(stand_in_models / "models/insightface/models/ga_pixels/genderage.onnx", 0.5, 0.5, 30,
                    weight_scale=2e-3, seed=3)
    upright = letterbox(photo_array(shared_data, "obama/obama.jpg"), 320)
    image = image_batch([upright, np.ascontiguousarray(np.rot90(upright, 1))])
    faces = detect_faces(image, no_face="error")
    crops, _, _ = FacecondFaceChainPreprocess().prepare(image, faces, 64, 2.0, "ellipse", "keep")
    report = FacecondFaceChainTagFaces().tag(crops, image, faces, "ga_pixels/genderage.onnx", AUTO, "sks", "", 20,
                                             1)[3]
    p = [[float(v) for v in re.findall(r"p_(?:female|male) (-?[0-9.]+)", line)] for line in report.splitlines()
         if line.startswith("face ")]
    assert len(p) == 2 and abs(p[0][0] - 0.5) > 0.02, report  # the pixels moved the output
    assert np.allclose(p[0], p[1], atol=0.02), report  # same face, same reading
