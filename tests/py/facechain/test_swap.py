"""insightface-format face swap (py/facechain/swap.py) against a stand-in ONNX graph of inswapper's signature
written at test time (scripts/facecond_dev/stand_in_swap.py): its output is 0.5 (1 - target) + 0.5 sigmoid(source . v),
so every swapped crop is computed here by hand."""

import cv2
import numpy as np
import pytest

from facecond.py.facechain import swap
from facecond.py.faces import onnx_pack
from facecond.py.faces.align import ARCFACE_DST, arcface_affine
from facecond_dev import stand_in_swap

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    path = tmp_path_factory.mktemp("swap") / "inswapper_stand_in.onnx"
    return stand_in_swap.write_stand_in(path, embed_dim=128, seed=3)


def test_swap_affine_is_insightface_norm_crop_128():
    # insightface estimate_norm(kps, 128): dst = arcface_dst * 1 + (8, 0). For landmarks already on the 112
    # template, A is the identity, so the 128 matrix is a pure 8-px shift.
    m = swap.swap_affine(arcface_affine(ARCFACE_DST))
    assert np.allclose(m, [[1, 0, 8], [0, 1, 0]], atol=1e-4)
    # for any face: the landmarks land on the shifted template
    lm = ARCFACE_DST * 2.5 + np.array([40.0, 17.0])
    m = swap.swap_affine(arcface_affine(lm))
    got = lm @ m[:, :2].T + m[:, 2]
    assert np.allclose(got, ARCFACE_DST + np.array([8.0, 0.0]), atol=1e-3)


def test_swap_mask_is_the_inner_face_ellipse_shifted_8px():
    mask = swap.swap_mask(0.1)
    assert mask.shape == (128, 128)
    assert mask[52, 64] == 1.0  # the ellipse centre (56, 52) of the 112 crop, 8 px right
    assert mask[:, :8].max() == 0.0 and mask[:, 120:].max() == 0.0 and mask[112:].max() == 0.0
    assert mask[5, 5] == 0.0 and mask[2, 64] < 1.0  # corner outside, top edge feathered


def test_the_stand_in_is_recognised_and_its_emap_read(stand_in):
    _, emap = stand_in_swap.stand_in_tensors(128, seed=3)
    got = swap.last_initializer(stand_in)
    assert got.shape == (128, 512) and np.array_equal(got, emap)  # bit-exact, without the onnx package
    assert swap.is_swapper_file(stand_in)
    assert swap.list_swappers([stand_in.parent]) == [stand_in.name]
    assert swap.resolve_swapper([stand_in.parent], stand_in.name) == stand_in
    with pytest.raises(FileNotFoundError, match=r"inswapper_128\.onnx into models/insightface"):
        swap.resolve_swapper([stand_in.parent], "nothing.onnx")
    # the shape rule alone
    assert swap.is_swapper_io([[1, 3, 128, 128], [1, 512]], 1)
    assert not swap.is_swapper_io([[1, 3, 112, 112]], 1)  # a recogniser
    assert not swap.is_swapper_io([[1, 3, 128, 128], [1, 512]], 2)


def test_a_recogniser_is_not_listed_as_a_swapper(shared_data, tmp_path):
    rec = shared_data / "models" / "insightface_testpack" / "mobilefacenet_128.onnx"
    (tmp_path / rec.name).symlink_to(rec)
    assert not swap.is_swapper_file(rec) and swap.list_swappers([tmp_path]) == []


def test_latent_is_normed_embedding_times_emap_normed():
    emap = np.array([[1.0, 2.0, 0.0], [0.0, 1.0, 2.0]], np.float32)
    e = np.array([3.0, 4.0])  # normed: (0.6, 0.8); @ emap: (0.6, 2.0, 1.6); norm sqrt(0.36 + 4 + 2.56) = 2.6306
    lat = swap.swap_latent(e, emap)
    n = np.sqrt(0.36 + 4.0 + 2.56)
    assert lat.shape == (1, 3) and np.allclose(lat, [[0.6 / n, 2.0 / n, 1.6 / n]], atol=1e-6)


def test_swap_face_pastes_the_models_output_inside_the_mask(stand_in, shared_data):
    from PIL import Image

    image = np.asarray(Image.open(shared_data / "faces/obama/obama.jpg").convert("RGB").resize((228, 284)),
                       np.float32) / 255.0
    # landmarks of a face at a known place: the 112 template scaled x1.3, turned 10 degrees, moved
    rot = cv2.getRotationMatrix2D((56.0, 56.0), 10.0, 1.3)
    lm = ARCFACE_DST @ rot[:, :2].T + rot[:, 2] + np.array([50.0, 70.0])
    affine = arcface_affine(lm)
    v, emap = stand_in_swap.stand_in_tensors(128, seed=3)
    e = np.random.default_rng(0).standard_normal(128)
    latent = swap.swap_latent(e, emap)
    swapper = swap.Swapper(stand_in)
    assert swapper.embed_dim == 128 and swapper.target_name == "target" and swapper.source_name == "source"
    mask = swap.swap_mask(0.1)
    before = image.copy()
    out, alpha, face = swap.swap_face(image, affine, swapper, latent, mask)
    assert np.array_equal(image, before)
    # the 128 crop by hand: warpAffine through T(8, 0) o A, then the stand-in's formula
    m = affine.astype(np.float64).copy()
    m[0, 2] += 8.0
    crop = cv2.warpAffine(image, m, (128, 128), flags=cv2.INTER_LINEAR, borderValue=0)
    lat_hand = (e / np.linalg.norm(e)) @ emap.astype(np.float64)
    lat_hand /= np.linalg.norm(lat_hand)
    want = np.clip(stand_in_swap.expected_output(crop, lat_hand, v), 0, 1)
    assert np.allclose(face, want, atol=1e-5)
    # pasted back: where alpha is 1 the image holds the output warped back; where 0 it is untouched
    back = cv2.warpAffine(want, m, (228, 284), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)
    full, zero = alpha == 1.0, alpha == 0.0
    assert full.sum() > 1000 and np.allclose(out[full], back[full], atol=1e-5)
    assert np.array_equal(out[zero], image[zero]) and zero.sum() > 0.5 * zero.size
    # the face region is where the landmarks are: nose tip inside the full-alpha area
    nx, ny = np.round(lm[2]).astype(int)
    assert alpha[ny, nx] == 1.0


def test_last_initializer_refuses_a_graph_without_one(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    p = tmp_path / "id.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(p))
    with pytest.raises(ValueError, match="no initialisers"):
        swap.last_initializer(p)
    assert onnx_pack.onnx_io(p) == ([[1]], 1) and not swap.is_swapper_file(p)


def test_a_swap_model_is_not_listed_as_a_recogniser(stand_in, tmp_path):
    # insightface model_zoo: two inputs at 128x128 is INSwapper; a one-input 128x128 graph would be an ArcFace
    assert onnx_pack.classify_file(stand_in) == "swap"
    assert onnx_pack.classify_shapes([1, 3, 128, 128], 1, n_inputs=1) == "recognition"
    pack = tmp_path / "models" / "mypack"
    pack.mkdir(parents=True)
    (pack / "inswapper_128.onnx").write_bytes(stand_in.read_bytes())
    assert onnx_pack.list_models([tmp_path], "recognition") == []
