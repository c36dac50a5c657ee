"""IdentityScore, CLIPScore and EvalAggregate in-process on real ComfyUI objects: real photos and the insightface
test recogniser (../shared/data), and a tiny random-weight CLIPModel written in the real folder layout."""

import math
from pathlib import Path

import folder_paths
import numpy as np
import pytest
import torch
from PIL import Image

from facecond.nodes.evaluate.scores import FacecondCLIPScore, FacecondEvalAggregate, FacecondIdentityScore
from facecond.nodes.faces.detect_embed import FacecondFaceDetectCrop, FacecondFaceEmbed
from facecond.py.evaluate.clip_score import ClipScorer
from facecond_dev.tiny_clip import write_tiny_clip

REC = "testpack/mobilefacenet_128.onnx"
pytestmark = pytest.mark.usefixtures("one_torch_thread", "stand_in_models")


def _img(path, side=150) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB").resize((side, side)), np.float32) / 255.0


@pytest.fixture(scope="module")
def clip_folder(comfy_base):
    root = folder_paths.get_folder_paths("facecond_clip_score")[0]
    return write_tiny_clip(Path(root) / "tiny-clip")


def _reference(image):
    with torch.inference_mode():
        faces = FacecondFaceDetectCrop().detect(image, detector="mtcnn", select="largest", face_index=0, min_size=20,
                                                margin_scale=1.0, upright="off", no_face="error")[0]
        return FacecondFaceEmbed().embed(faces, model=REC, facenet_layer="bottleneck_512", normalize="auto")[0]


def test_identity_score_own_person_first_faceless_flagged(shared_data):
    johns = shared_data / "faces" / "johns"
    people = sorted(p.name for p in johns.iterdir())
    photos = {p: sorted((johns / p).glob("*.jpg")) for p in people}
    ref = _reference(torch.from_numpy(_img(photos[people[1]][0])[None]))
    # 2 images per group: (own person, other) and (third person, no face)
    batch = np.stack([_img(photos[people[1]][4]), _img(photos[people[0]][4]), _img(photos[people[2]][4]),
                      np.full((150, 150, 3), 0.3, np.float32)])
    images = torch.from_numpy(batch)
    before = images.clone()
    with torch.inference_mode():
        scores, best, mean, report = FacecondIdentityScore().score(
            images, ref, detector="mtcnn", model=REC, reference_mode="mean", no_face="flag", images_per_group=2,
            min_size=20)
    v = scores.values
    assert v[0] > 0.4 and v[1] < v[0] - 0.3 and v[2] < v[0] - 0.3 and math.isnan(v[3]), report
    assert best == pytest.approx((v[0] + v[2]) / 2) and mean == pytest.approx(sum(v[:3]) / 3)
    assert "no face in image(s) [3]" in report and torch.equal(images, before)
    assert "preprocessing insightface, detector mtcnn" in report  # auto: insightface-exact for an .onnx recogniser
    with torch.inference_mode(), pytest.raises(ValueError, match="IdentityScore: 'reference' was embedded with"):
        FacecondIdentityScore().score(images[:1], ref.with_embeds(ref.embeds, model="facenet-vggface2/bottleneck"),
                                      detector="mtcnn", model=REC, reference_mode="mean", no_face="flag",
                                      images_per_group=0, min_size=20)
    with torch.inference_mode(), pytest.raises(ValueError, match=r"IdentityScore: .*groups of 3"):
        FacecondIdentityScore().score(images, ref, detector="mtcnn", model=REC, reference_mode="mean",
                                      no_face="zero", images_per_group=3, min_size=20)


def test_clip_score_and_aggregates_by_hand(clip_folder):
    assert "tiny-clip" in FacecondCLIPScore.INPUT_TYPES()["required"]["clip_model"][0]
    g = torch.Generator().manual_seed(1)
    images = torch.rand(4, 48, 48, 3, generator=g)
    prompts = "a photo of a person\na painting of a person"
    with torch.inference_mode():
        clip, cbest, cmean, _ = FacecondCLIPScore().score(images, prompts, "tiny-clip", images_per_group=2)
    want = ClipScorer(clip_folder).cosines(images, ["a photo of a person"] * 2 + ["a painting of a person"] * 2)
    assert clip.values == pytest.approx(want.tolist(), abs=1e-6)
    assert cmean == pytest.approx(float(want.mean())) and cbest == pytest.approx(
        (max(want[:2]) + max(want[2:])).item() / 2)
    ident = type(clip)("identity", (0.5, float("nan"), 0.2, 0.6), "rec")
    agg, best, mean, _ = FacecondEvalAggregate().combine(ident, clip, "livshits", 2)
    c = clip.values
    hand = [(1 + c[0]) * 1.5, (1 + c[2]) * 1.2, (1 + c[3]) * 1.6]
    assert math.isnan(agg.values[1]) and agg.values[0] == pytest.approx(hand[0])
    assert mean == pytest.approx(sum(hand) / 3) and best == pytest.approx((hand[0] + max(hand[1:])) / 2)
    f0 = FacecondEvalAggregate().combine(ident, clip, "face0", 0)
    assert f0[0].values[3] == pytest.approx(c[3] + 0.6) and f0[1] == pytest.approx(max(c[0] + 0.5, c[2] + 0.2,
                                                                                          c[3] + 0.6))
    with pytest.raises(ValueError, match="EvalAggregate: input 'clip_scores' must come from CLIPScore"):
        FacecondEvalAggregate().combine(ident, ident, "face0", 0)
    with pytest.raises(FileNotFoundError, match="CLIPScore: no CLIP model folder 'missing'"):
        FacecondCLIPScore().score(images, prompts, "missing", 0)
