"""insightface genderage (py/faces/genderage.py) on stand-in ONNX graphs built here (scripts/facecond_dev/
onnx_standins.py): the crop matrix and normalisation rule by hand, the output decoding on a constant model, and
the same numbers as insightface's own ``Attribute.get`` on real photos with a model whose output depends on
every input pixel."""

import numpy as np
import pytest
from PIL import Image

from facecond.py.faces import detect, genderage
from facecond.py.faces import onnx_pack as ifp
from facecond_dev.onnx_standins import genderage_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_crop_matrix_by_hand():
    # box 40 x 80 centred on (30, 60): s = 96 / (1.5 * 80) = 0.8; the centre goes to (48, 48)
    m = genderage.crop_matrix((10, 20, 50, 100))
    assert np.allclose(m, [[0.8, 0.0, 48 - 0.8 * 30], [0.0, 0.8, 48 - 0.8 * 60]])
    # a quarter turn about the box centre: the point right of the centre lands below it in the crop
    q = genderage.crop_matrix((10, 20, 50, 100), rotation=90)
    assert np.allclose(q[:, :2], [[0.0, -0.8], [0.8, 0.0]]) and np.allclose(q @ [30, 60, 1], [48, 48])
    assert np.allclose(q @ [40, 60, 1], [48, 48 + 8])
    with pytest.raises(ValueError, match="no area"):
        genderage.crop_matrix((10, 10, 10, 30))


def test_upright_rotation_quarter_turns():
    def aff(deg):
        r = np.radians(deg)
        return np.array([[np.cos(r), -np.sin(r), 0.0], [np.sin(r), np.cos(r), 0.0]])

    assert [genderage.upright_rotation(aff(d)) for d in (0, 30, -44, 80, 100, -90, 179, -170)] == \
        [0.0, 0.0, 0.0, 90.0, 90.0, -90.0, 180.0, 180.0]


def test_normalisation_rule(tmp_path):
    plain = genderage_model(tmp_path / "plain.onnx", 0.5, 0.5, 30)
    mx = genderage_model(tmp_path / "mx.onnx", 0.5, 0.5, 30, mxnet_prefix=True)
    assert genderage.normalisation(plain) == (127.5, 128.0)
    assert genderage.normalisation(mx) == (0.0, 1.0)
    assert ifp.classify_file(plain) == "genderage" and ifp.classify_file(mx) == "genderage"


def test_blob_is_the_normalised_rgb_crop():
    img = np.zeros((200, 200, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 255, 128, 0
    # box of side 64 at the centre: s = 1, so the 96 px input is the photo's 96 px around (100, 100)
    x = genderage.blob(img, (68, 68, 132, 132), 127.5, 128.0)
    assert x.shape == (1, 3, 96, 96) and x.dtype == np.float32
    assert np.allclose(x[0, :, 48, 48], [(255 - 127.5) / 128, 0.5 / 128, -127.5 / 128])
    # a box near the corner: outside the photo is black (0 -> -127.5/128)
    y = genderage.blob(img, (0, 0, 64, 64), 127.5, 128.0)
    assert np.allclose(y[0, :, 0, 0], -127.5 / 128) and np.allclose(y[0, 0, 95, 95], (255 - 127.5) / 128)


def test_constant_model_decodes_gender_and_age(tmp_path):
    img = np.full((120, 120, 3), 90, np.uint8)
    box = (20, 20, 100, 100)
    male = ifp.make_session(genderage_model(tmp_path / "m.onnx", 0.2, 0.8, 34.4))
    got = genderage.predict(male, img, box, 127.5, 128.0)
    assert (got.gender, got.age) == ("male", 34)  # round(100 * 0.344)
    assert got.p_female == pytest.approx(0.2) and got.p_male == pytest.approx(0.8)
    female = ifp.make_session(genderage_model(tmp_path / "f.onnx", 0.9, 0.1, 7.6))
    assert (genderage.predict(female, img, box, 127.5, 128.0).gender,
            genderage.predict(female, img, box, 127.5, 128.0).age) == ("female", 8)
    tie = ifp.make_session(genderage_model(tmp_path / "t.onnx", 0.5, 0.5, 50))
    assert genderage.predict(tie, img, box, 127.5, 128.0).gender == "female"  # np.argmax: the first, p_female


@pytest.mark.parametrize("mxnet_prefix", [False, True])
def test_same_answer_as_insightface_on_real_photos(tmp_path, shared_data, mxnet_prefix):
    attribute = pytest.importorskip("insightface.model_zoo.attribute")
    from insightface.app.common import Face

    scale = 1e-5 if mxnet_prefix else 2e-3  # raw 0..255 pixels or about -1..1: outputs of order 0.1
    path = genderage_model(tmp_path / "ga.onnx", 0.3, 0.4, 40, weight_scale=scale, seed=1, mxnet_prefix=mxnet_prefix)
    theirs = attribute.Attribute(model_file=str(path))
    ours = ifp.make_session(path)
    mean, std = genderage.normalisation(path)
    assert (mean, std) == (theirs.input_mean, theirs.input_std)
    scrfd = detect.SCRFD(ifp.make_session(shared_data / "models/insightface_testpack/det_2.5g.onnx"))
    genders = set()
    for name in ("obama/obama.jpg", "biden/biden.jpg", "astronaut/astronaut.png"):
        rgb = np.asarray(Image.open(shared_data / "faces" / name).convert("RGB"))
        box = scrfd.detect(rgb[None].astype(np.float32), 20)[0].boxes[0]
        face = Face(bbox=np.asarray(box, np.float32))
        g, age = theirs.get(np.ascontiguousarray(rgb[..., ::-1]), face)  # insightface reads BGR
        raw = theirs.session.run(theirs.output_names, {theirs.input_name: genderage.blob(rgb, box, mean, std)})[0]
        got = genderage.predict(ours, rgb, np.asarray(box, np.float32), mean, std)
        assert (got.gender, got.age) == ("male" if g == 1 else "female", age), name
        assert np.allclose([got.p_female, got.p_male], raw[0, :2], atol=1e-5)
        assert abs(got.p_female - 0.3) > 1e-3  # the pixels moved the output: the crop matters
        genders.add(got.gender)
