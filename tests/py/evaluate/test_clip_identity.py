"""CLIP score on a tiny random-weight CLIPModel written in the real folder layout, and the identity score with the
real test recogniser on real photos (py/evaluate/clip_score.py, identity.py)."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from facecond.py.evaluate import clip_score, identity
from facecond.py.faces import embed
from facecond_dev.tiny_clip import write_tiny_clip  # scripts/ is on the path (tests/conftest.py)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    return write_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


def test_clip_cosine_equals_transformers_own_logits(tiny_clip):
    scorer = clip_score.ClipScorer(tiny_clip)
    assert clip_score.list_clip_folders([tiny_clip.parent, "/nonexistent"]) == ["tiny-clip"]
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 40, 56, 3, generator=g)
    texts = ["a photo of a person", "a painting of a cat", "a photo of a person", "an astronaut"]
    cos = scorer.cosines(images, texts)
    # the same numbers through CLIPModel.forward: logits_per_image = exp(logit_scale) * cosine matrix
    px = scorer.preprocess(images)
    assert px.shape == (4, 3, 32, 32)
    tok = scorer.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = scorer.model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], pixel_values=px)
    want = torch.diagonal(out.logits_per_image).double() / scorer.model.logit_scale.exp().double()
    assert torch.allclose(cos, want, atol=1e-5)
    # a different prompt gives a different score; one prompt per image is checked
    assert not math.isclose(cos[0], cos[1])
    with pytest.raises(ValueError, match="4 image"):
        scorer.cosines(images, texts[:3])


def test_clip_folder_errors_and_prompt_blocks(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a CLIP model folder"):
        clip_score.ClipScorer(tmp_path)
    assert clip_score.prompts_for(["a", "b"], 4) == ["a", "a", "b", "b"]
    assert clip_score.prompts_for(["a", " "], 3) == ["a", "a", "a"]
    with pytest.raises(ValueError, match="3 prompts for 4 images"):
        clip_score.prompts_for(["a", "b", "c"], 4)


def _photo(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), np.float32) / 255.0


def test_identity_score_ranks_the_same_person_first(shared_data, mtcnn):
    johns = shared_data / "faces" / "johns"
    rec = embed.load_onnx_recogniser(shared_data / "models" / "insightface_testpack" / "mobilefacenet_128.onnx")
    people = sorted(p.name for p in johns.iterdir())
    files = {p: sorted((johns / p).glob("*.jpg")) for p in people}
    ref = [_photo(files[people[0]][0]), _photo(files[people[0]][1])]
    gen = np.stack([_photo(files[p][5]) for p in people] + [np.full((150, 150, 3), 0.5, np.float32)])
    res = identity.score_images(gen, ref, mtcnn, rec, no_face="flag", mode="mean")
    same, others = res.scores[0], res.scores[1:3]
    assert same > 0.4 and all(o < same - 0.3 for o in others), res.report()
    assert res.has_face == (True, True, True, False) and res.faceless == [3] and math.isnan(res.scores[3])
    assert res.model.startswith("insightface/mobilefacenet_128.onnx@")
    best, mean = res.summary()
    assert best == pytest.approx(same) and mean == pytest.approx(sum(res.scores[:3]) / 3)
    # by hand: the mean of the cosines with both reference photos' embeddings
    faces = identity.detect_and_crop(mtcnn, gen[:1])
    r = torch.cat([identity.embed_faces(rec, identity.detect_and_crop(mtcnn, p[None])) for p in ref])
    g = identity.embed_faces(rec, faces)
    hand = float((F.normalize(g, dim=1) @ F.normalize(r, dim=1).T).mean())
    assert same == pytest.approx(hand, abs=1e-6)
    # faceless policies: zero counts 0, passthrough scores the centre square (still flagged)
    zero = identity.score_images(gen[3:], ref, mtcnn, rec, no_face="zero")
    passed = identity.score_images(gen[3:], ref, mtcnn, rec, no_face="passthrough")
    assert zero.scores == (0.0,) and not math.isnan(passed.scores[0]) and passed.has_face == (False,)
    with pytest.raises(ValueError, match="none of the 1 reference photo"):
        identity.score_images(gen[:1], [gen[3]], mtcnn, rec)
