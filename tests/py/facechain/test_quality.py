"""FaceChain template-face quality (py/facechain/quality.py): exact terms on hand-made landmarks, and a sensible
ordering on real photos: a frontal sharp face beats the same face blurred, rotated or cut by the frame."""


import cv2
import numpy as np
import pytest
from PIL import Image

from facecond.py.facechain import quality as fq
from facecond.py.faces import crop
from facecond.py.faces.align import ARCFACE_DST

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _rotate(lm, deg, center=(56.0, 56.0)):
    m = cv2.getRotationMatrix2D(center, deg, 1.0)
    return lm @ m[:, :2].T + m[:, 2]


def test_pose_terms_of_the_template_and_turned_faces():
    yaw, roll, pitch = fq.pose_terms(ARCFACE_DST)
    assert yaw < 0.02 and roll < 0.01 and pitch < 0.01
    assert fq.frontality(ARCFACE_DST) > 0.98
    # a pure in-plane rotation changes only roll: 45 degrees -> roll 1, yaw and pitch unchanged
    y2, r2, p2 = fq.pose_terms(_rotate(ARCFACE_DST, 45.0))
    assert abs(r2 - 1.0) < 1e-3 and abs(y2 - yaw) < 1e-3 and abs(p2 - pitch) < 1e-3
    # the nose moved onto the right eye's column: yaw 1
    turned = ARCFACE_DST.copy()
    turned[2, 0] = ARCFACE_DST[1, 0]
    assert abs(fq.pose_terms(turned)[0] - 1.0) < 0.01  # the template eye line is 0.1 degree off level
    # mouth above the eyes (upside-down landmarks): pitch saturates
    assert fq.pose_terms(ARCFACE_DST * np.array([1.0, -1.0]))[2] == 1.0


def test_visibility_size_and_sharpness_terms():
    assert fq.visibility(np.array([40, 40, 60, 60.0]), (100, 100)) == 1.0
    # box 0..20 grown by 20% -> -2..22 wide; inside 0..22 of 24 on each axis
    assert abs(fq.visibility(np.array([0, 0, 20, 20.0]), (100, 100)) - (22 / 24) ** 2) < 1e-9
    assert fq.size_term(np.array([0, 0, 32, 20.0])) == 0.0 and fq.size_term(np.array([0, 0, 256, 300.0])) == 1.0
    assert abs(fq.size_term(np.array([0, 0, 0, 90.50967])) - 0.5) < 1e-4  # sqrt(32 * 256): the log midpoint
    flat = np.full((112, 112, 3), 0.5, np.float32)
    assert fq.laplacian_variance(flat) == 0.0
    checker = (np.indices((112, 112)).sum(0) % 2).astype(np.float32)[..., None].repeat(3, -1)
    lap = fq.laplacian_variance(checker)  # +-4*255 at every pixel (interior)
    assert 0.9 * (4 * 255) ** 2 < lap <= (4 * 255) ** 2 + 1


def test_passthrough_face_scores_zero():
    q = fq.face_quality(0.0, np.array([0, 0, 112, 112.0]), ARCFACE_DST, np.random.rand(112, 112, 3), (112, 112))
    assert q.total == 0.0


def _load(shared_data, rel, blur=0.0, rotate=0.0, max_side=700):
    im = Image.open(shared_data / "faces" / rel).convert("RGB")
    f = max_side / max(im.size)
    im = im.resize((round(im.width * f), round(im.height * f)), Image.LANCZOS)
    a = np.asarray(im, np.float32) / 255.0
    if blur:
        a = cv2.GaussianBlur(a, (0, 0), blur)
    if rotate:
        h, w = a.shape[:2]
        a = cv2.warpAffine(a, cv2.getRotationMatrix2D((w / 2, h / 2), rotate, 1.0), (w, h))
    return a


def _quality(mtcnn, img) -> fq.Quality:
    per_image = crop.detect_faces(mtcnn, img[None] * 255.0, min_size=40, select_mode="largest", face_index=0,
                                  upright="rotate_if_no_face")
    f = crop.crop_faces(img[None], per_image, no_face="error", margin_scale=1.0, detector_name="mtcnn").faces
    return fq.face_quality(float(f.scores[0]), f.boxes[0].numpy(), f.landmarks[0].numpy(),
                           f.crops_arcface[0].numpy(), f.image_size)


def test_quality_ordering_on_real_photos(shared_data, mtcnn):
    good = _quality(mtcnn, _load(shared_data, "obama/obama.jpg"))
    blurred = _quality(mtcnn, _load(shared_data, "obama/obama.jpg", blur=3.0))
    rotated = _quality(mtcnn, _load(shared_data, "obama/obama.jpg", rotate=30.0))
    partial = [_quality(mtcnn, _load(shared_data, f"obama/obama_partial_face{s}.jpg")) for s in ("", "2")]
    # measured: good 0.94, blurred 0.73, rotated 0.86, partial 0.74 / 0.71
    assert good.total > 0.9
    assert blurred.sharpness < 0.5 * good.sharpness and blurred.total < good.total - 0.1
    assert rotated.roll > 0.6 and rotated.total < good.total - 0.05
    for p in partial:
        assert p.visibility < 0.9 and p.total < good.total - 0.1
    assert fq.rank_faces([blurred, partial[0], good, rotated])[0] == 2
