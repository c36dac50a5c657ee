"""Detectors on real photos (shared data): MTCNN finds one face per portrait, SCRFD agrees, policies hold."""

import glob
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facecond.py.faces import crop, detect
from facecond.py.faces import onnx_pack as ifp

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def scrfd(shared_data):
    return detect.SCRFD(ifp.make_session(shared_data / "models/insightface_testpack/det_2.5g.onnx"))


def _load(path, max_side: int = 4096) -> np.ndarray:
    """A photo as float32 RGB 0..255, at most max_side pixels long (keeps the suite fast on 2 cores)."""
    im = Image.open(path).convert("RGB")
    if max(im.size) > max_side:
        f = max_side / max(im.size)
        im = im.resize((round(im.width * f), round(im.height * f)), Image.LANCZOS)
    return np.asarray(im, np.float32)


def _photos(shared_data, johns_every=4):
    full = sorted(glob.glob(str(shared_data / "faces/[aob]*/*.*")))
    johns = sorted(glob.glob(str(shared_data / "faces/johns/*/*.jpg")))[::johns_every]
    return full + johns


@pytest.fixture(scope="module")
def mtcnn_found(shared_data, mtcnn):
    """MTCNN on every portrait (all 33 johns chips, obama, biden, astronaut): {path: (image, Detections)}."""
    out = {}
    for path in _photos(shared_data, johns_every=1):
        img = _load(path)
        out[path] = (img, mtcnn.detect(img[None], 40)[0])
    return out


def test_mtcnn_finds_exactly_one_face_in_each_portrait(mtcnn_found):
    assert len(mtcnn_found) == 40
    for path, (_, raw) in mtcnn_found.items():
        det = detect.filter_min_size(raw, 40)
        assert len(det) == 1, f"{path}: {len(det)} faces, scores {det.scores}"
        assert det.scores[0] > 0.95


def test_scrfd_boxes_agree_with_mtcnn(shared_data, mtcnn_found, scrfd):
    ious = {}
    for path in _photos(shared_data):
        img, a = mtcnn_found[path]
        b = scrfd.detect(img[None], 40)[0]
        assert len(b) == 1, f"{path}: SCRFD found {len(b)} faces"
        ious[Path(path).name] = float(detect.box_iou(a.boxes, b.boxes)[0, 0])
        if "partial" not in path:  # both see a whole face: the eyes agree within a few pixels
            eye_err = np.abs(a.landmarks[0, :2] - b.landmarks[0, :2]).max()
            assert eye_err < 0.06 * (b.boxes[0, 2] - b.boxes[0, 0]), (path, eye_err)
    # measured: 0.88-0.94 on the full photos, 0.6-0.85 on the 150 px chips and partial faces
    assert min(ious.values()) > 0.5, ious
    assert np.median(list(ious.values())) > 0.75, ious


def test_nms_and_decoding():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], np.float32)
    keep = detect.nms(boxes, np.array([0.9, 0.8, 0.7], np.float32), 0.4)
    assert keep.tolist() == [0, 2]
    pts = np.array([[100.0, 50.0]], np.float32)
    np.testing.assert_allclose(detect.distance2bbox(pts, np.array([[10, 20, 30, 40]], np.float32)), [[90, 30, 130, 90]])
    kps = detect.distance2kps(pts, np.arange(10, dtype=np.float32)[None])
    np.testing.assert_allclose(kps[0, 2], [104.0, 55.0])


def test_select_modes_order_left_to_right():
    boxes = np.array([[100, 0, 120, 20], [0, 0, 50, 50], [200, 0, 230, 30]], np.float32)
    det = detect.Detections(boxes, np.ones(3, np.float32), np.zeros((3, 5, 2), np.float32))
    assert detect.select(det, "largest").boxes[0, 0] == 0
    assert detect.select(det, "all").boxes[:, 0].tolist() == [0, 100, 200]
    assert detect.select(det, "index", 2).boxes[0, 0] == 200
    assert len(detect.select(det, "index", 3)) == 0


@pytest.mark.parametrize("k", [1, 3])
def test_upright_correction_finds_turned_faces(shared_data, mtcnn, k):
    img = _load(shared_data / "faces/obama/obama.jpg")
    ref = crop.detect_faces(mtcnn, img[None], min_size=40, select_mode="largest", face_index=0, upright="off")[0][0]
    turned = np.ascontiguousarray(np.rot90(img, -k))  # the face lies on its side
    off = crop.detect_faces(mtcnn, turned[None], min_size=40, select_mode="largest", face_index=0, upright="off")
    got = crop.detect_faces(mtcnn, turned[None], min_size=40, select_mode="largest", face_index=0,
                            upright="rotate_if_no_face")[0]
    assert not off[0] or off[0][0].score < got[0].score, "the turned face should need the upright search"
    assert len(got) == 1
    f = got[0]
    # the same face, cropped upright: the Face0 crop of the turned image matches the original's
    res_t = crop.crop_faces(turned[None] / 255, [[f]], no_face="error", margin_scale=1.0, detector_name="mtcnn")
    res_o = crop.crop_faces(img[None] / 255, [[ref]], no_face="error", margin_scale=1.0, detector_name="mtcnn")
    diff = np.abs(res_t.faces.crops_facenet.numpy() - res_o.faces.crops_facenet.numpy()).mean()
    assert diff < 0.08, diff
    assert abs(abs(f.angle) - np.pi / 2) < 0.3  # the eye line is vertical in the turned image


def test_no_face_policies_on_a_mixed_batch(shared_data, mtcnn):
    face = _load(shared_data / "faces/astronaut/astronaut.png")
    blank = np.full_like(face, 128.0)
    batch = np.stack([face, blank, face])
    per = crop.detect_faces(mtcnn, batch, min_size=40, select_mode="largest", face_index=0, upright="off")
    assert [len(p) for p in per] == [1, 0, 1]
    with pytest.raises(crop.NoFaceError, match=r"no face found in image 1 of 3 \(min_size=40"):
        crop.crop_faces(batch / 255, per, no_face="error", margin_scale=1.0, detector_name="mtcnn", min_size=40)
    skip = crop.crop_faces(batch / 255, per, no_face="skip", margin_scale=1.0, detector_name="mtcnn")
    assert skip.faces.source_index == (0, 2) and skip.faces.skipped == (1,)
    assert "image 1: no face (skipped)" in skip.report
    pas = crop.crop_faces(batch / 255, per, no_face="passthrough", margin_scale=1.0, detector_name="mtcnn")
    assert pas.faces.source_index == (0, 1, 2) and pas.faces.scores[1] == 0.0
    np.testing.assert_allclose(pas.faces.crops_arcface[1, 2:-2, 2:-2].numpy(), 128 / 255, atol=1e-4)  # the image
    with pytest.raises(crop.NoFaceError, match="any of the 1 images"):
        crop.crop_faces(blank[None] / 255, [[]], no_face="skip", margin_scale=1.0, detector_name="mtcnn")


def test_aligned_crop_puts_the_landmarks_on_the_arcface_template(shared_data, scrfd):
    img = _load(shared_data / "faces/obama/obama2.jpg")
    per = crop.detect_faces(scrfd, img[None], min_size=40, select_mode="largest", face_index=0, upright="off")
    res = crop.crop_faces(img[None] / 255, per, no_face="error", margin_scale=1.0, detector_name=scrfd.name)
    f = res.faces
    assert f.crops_arcface.shape == (1, 112, 112, 3) and f.crops_facenet.shape == (1, 160, 160, 3)
    pts = crop.crop_points(f, 0)
    err = np.linalg.norm(pts - crop.ARCFACE_DST, axis=1)  # a turned head is not the template, but close to it
    assert err.max() < 8.0 and err.mean() < 3.5, err
    assert 0.05 < float(f.crops_arcface.mean()) < 0.95
