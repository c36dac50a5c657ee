"""FaceChain's preprocessing, template choice and similarity ranking nodes (nodes/facechain/chain.py) in-process on
real photos (../shared/data/faces)."""

import itertools

import cv2
import numpy as np
import pytest
import torch

from facecond.nodes.facechain.chain import (
    FacecondChooseTemplateFace,
    FacecondFaceChainPreprocess,
    FacecondRankBySimilarity,
)
from facecond.py.faces import crop
from facecond.py.faces.align import transform_points
from facecond.py.faces.types import Faces
from facecond_dev.face_photos import detect_faces, embed_faces, image_batch, letterbox, photo_array

pytestmark = pytest.mark.usefixtures("one_torch_thread", "stand_in_models")


def test_choose_template_prefers_the_frontal_sharp_photo(shared_data):
    full = photo_array(shared_data, "obama/obama.jpg")  # 1137 x 910
    h, w = full.shape[:2]
    pad = lambda a, left: np.pad(a, ((0, 0), (w - a.shape[1], 0) if left else (0, w - a.shape[1]), (0, 0)))  # noqa: E731
    partial = pad(photo_array(shared_data, "obama/obama_partial_face.jpg"), left=False)  # face cut by the left edge
    partial2 = pad(photo_array(shared_data, "obama/obama_partial_face2.jpg"), left=True)  # by the right edge
    blurred = cv2.GaussianBlur(full, (0, 0), 3.0)
    small = [np.clip(cv2.resize(a, (w // 2, h // 2), interpolation=cv2.INTER_AREA), 0, 1)
             for a in (blurred, partial, full, partial2)]
    image = image_batch(small)
    before = image.clone()
    faces = detect_faces(image, no_face="error")
    template, photo, crop112, report, index = FacecondChooseTemplateFace().choose(faces, image)
    assert index == 2 and torch.equal(photo[0], image[2]), report
    assert isinstance(template, Faces) and len(template) == 1 and template.source_index == (0,)
    assert template.num_images == 1 and crop112.shape == (1, 112, 112, 3)
    assert report.splitlines()[0] == "template: face 2 (image 2)" and len(report.splitlines()) == 5
    assert torch.equal(image, before)
    with pytest.raises(ValueError, match="ChooseTemplateFace: 'faces' were found in 4 image"):
        FacecondChooseTemplateFace().choose(faces, image[:2])


def test_ranking_order_matches_cosine_order_on_real_photos(shared_data):
    template_img = image_batch([letterbox(photo_array(shared_data, "obama/obama.jpg"), 400)])
    names = ["biden/biden.jpg", "obama/obama2.jpg", "johns/John_Salley/000179_02159509.jpg", "obama/obama3.jpg",
             None, "astronaut/astronaut.png"]
    gen = image_batch([letterbox(photo_array(shared_data, n), 400) if n else np.full((400, 400, 3), 0.5, np.float32)
                  for n in names])
    template = embed_faces(detect_faces(template_img, no_face="error"))
    faces = detect_faces(gen)
    embeds = embed_faces(faces)
    assert faces.source_index == (0, 1, 2, 3, 4, 5) and float(faces.scores[4]) == 0.0  # 4: passthrough
    cos = (embeds.embeds @ template.embeds[0]).numpy()  # both L2-normalised
    expected = [int(i) for i in np.argsort(-cos, kind="stable") if i != 4] + [4]
    node = FacecondRankBySimilarity()
    sorted_images, top, scores, report, order = node.rank(gen, embeds, template, 2, 0.0, faces)
    assert order == expected and set(order[:2]) == {1, 3}, report  # the two other Obama photos first
    assert np.allclose(scores[:-1], cos[expected[:-1]], atol=1e-6) and scores[-1] == -1.0
    assert all(a >= b for a, b in itertools.pairwise(scores))
    assert torch.equal(sorted_images, gen[expected]) and torch.equal(top, gen[expected[:2]])
    # temperature: softmax over the images with a face; same order
    _, _, soft, _, order_t = node.rank(gen, embeds, template, 2, 0.1, faces)
    e = np.exp(cos[expected[:-1]] / 0.1)
    assert order_t == expected and np.allclose(soft[:-1], e / e.sum(), atol=1e-6) and soft[-1] == -1.0
    # without 'faces' the passthrough row of the blank image is ranked like a face; with no_face=skip it has
    # no row at all and goes last again
    skip_faces = detect_faces(gen, no_face="skip")
    _, _, s2, _, order2 = node.rank(gen, embed_faces(skip_faces), template, 3, 0.0)
    assert order2 == expected and s2[-1] == -1.0


def test_preprocess_turns_faces_upright_and_centres_them(shared_data):
    obama = letterbox(photo_array(shared_data, "obama/obama.jpg"), 320)
    sideways = np.ascontiguousarray(np.rot90(obama, 1))  # face lying on its side
    tilted = cv2.warpAffine(obama, cv2.getRotationMatrix2D((160, 160), 25, 1.0), (320, 320))
    blank = np.full((320, 320, 3), 0.5, np.float32)
    image = image_batch([sideways, tilted, blank])
    faces = detect_faces(image)
    res = 160
    out, mask, report = FacecondFaceChainPreprocess().prepare(image, faces, res, 2.0, "ellipse", "keep")
    assert out.shape == (2, res, res, 3) and mask.shape == (2, res, res), report
    assert "photo 2: no face, dropped" in report
    assert float(mask[0, res // 2, res // 2]) == 1.0 and float(mask[0, 2, 2]) == 0.0
    again = detect_faces(out, no_face="error", upright="off")  # found without turning: the crops are upright
    for r in range(2):
        lm = again.landmarks[r].numpy()
        assert abs(crop.roll(lm)) < np.radians(10)
        centre = lm.mean(0)
        assert np.all(np.abs(centre - res / 2) < res * 0.1), centre
    # landmarks of the source faces map to the same place through the region affine
    from facecond.py.facechain.fusion import region_affine

    m = region_affine(faces.affine_arcface[0].numpy(), 2.0, res)
    eyes = transform_points(m, faces.landmarks[0].numpy())[:2]
    assert abs(eyes[0, 1] - eyes[1, 1]) < 3 and eyes[0, 0] < eyes[1, 0]
    white, _, _ = FacecondFaceChainPreprocess().prepare(image, faces, 64, 2.0, "ellipse", "white")
    assert float(white[0, 0, 0].min()) == 1.0  # corner outside the ellipse filled white


def test_preprocess_retouch_strength(shared_data):
    """retouch_strength 0 (and the default) leaves the crop bit-identical; 1 changes only pixels inside the head
    ellipse and smooths the skin there (high-frequency energy measured)."""
    image = image_batch([letterbox(photo_array(shared_data, "obama/obama.jpg"), 640)])
    faces = detect_faces(image, no_face="error")
    prep = FacecondFaceChainPreprocess()
    plain, _, _ = prep.prepare(image, faces, 320, 2.0, "ellipse", "keep")
    zero, _, _ = prep.prepare(image, faces, 320, 2.0, "ellipse", "keep", retouch_strength=0.0)
    smooth, mask, report = prep.prepare(image, faces, 320, 2.0, "ellipse", "keep", retouch_strength=1.0)
    assert torch.equal(plain, zero)
    changed = (smooth != plain).any(-1)[0].numpy()
    assert changed.any() and not changed[mask[0].numpy() == 0].any()
    assert "skin retouched" in report
    from facecond.py.facechain import fusion, retouch

    skin = retouch.skin_mask(plain[0].numpy(), fusion.ellipse_mask(2.0, 320, 0.15)) > 0.9  # fully blended there
    assert skin.mean() > 0.03, skin.mean()
    lap = lambda t: np.abs(cv2.Laplacian(t[0].numpy().mean(-1), cv2.CV_32F))[skin].mean()  # noqa: E731
    assert lap(smooth) < 0.8 * lap(plain), (lap(plain), lap(smooth))
    assert FacecondFaceChainPreprocess.VALIDATE_INPUTS(context=2.0, retouch_strength=1.5) != True  # noqa: E712
