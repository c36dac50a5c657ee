"""Recognisers: the insightface test pack separates identities on real photos; FaceNet loads the real key layout.

FaceNet's VGGFace2 weights cannot be downloaded here, so FaceNet is checked on a randomly initialised
Inception-ResNet-V1 saved in the real state-dict layout: shapes and plumbing only, not identity quality.
"""

import glob

import numpy as np
import pytest
import torch
from PIL import Image

from facecond.py.faces import crop, detect, embed, similarity
from facecond.py.faces import onnx_pack as ifp

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pack(shared_data):
    return shared_data / "models/insightface_testpack"


@pytest.fixture(scope="module")
def identity_embeds(shared_data, pack):
    """SCRFD + aligned crop + MobileFaceNet-128 on every johns chip and the obama/biden portraits."""
    det = detect.SCRFD(ifp.make_session(pack / "det_2.5g.onnx"))
    rec = embed.load_onnx_recogniser(pack / "mobilefacenet_128.onnx")
    files = sorted(glob.glob(str(shared_data / "faces/johns/*/*.jpg")))
    files += [str(shared_data / f"faces/obama/{n}.jpg") for n in ("obama", "obama2", "obama3")]
    files += [str(shared_data / "faces/biden/biden.jpg")]
    crops = []
    for f in files:
        img = np.asarray(Image.open(f).convert("RGB"), np.float32)
        per = crop.detect_faces(det, img[None], min_size=40, select_mode="largest", face_index=0, upright="off")
        crops.append(crop.crop_faces(img[None] / 255, per, no_face="error", margin_scale=1.0,
                                     detector_name=det.name).faces.crops_arcface)
    crops = torch.cat(crops)
    batched = rec.embed(crops)
    labels = [f.split("/")[-2] for f in files]
    return rec, crops, batched, labels


def test_same_person_beats_every_different_person(identity_embeds):
    rec, _, e, labels = identity_embeds
    assert e.shape == (37, 128) and rec.width == 128
    assert rec.model_id == "insightface/mobilefacenet_128.onnx@e72a5710"
    sim = similarity.cosine_matrix(e, e).numpy()
    lab = np.array(labels)
    same = (lab[:, None] == lab[None]) & ~np.eye(len(lab), dtype=bool)
    diff = lab[:, None] != lab[None]
    # measured: same-person min 0.64 (mean 0.83), different-person max 0.37 (mean 0.05)
    assert sim[same].min() > sim[diff].max(), (sim[same].min(), sim[diff].max())
    obama, biden = lab == "obama", lab == "biden"
    assert sim[np.ix_(obama, obama)][~np.eye(3, dtype=bool)].min() > sim[np.ix_(obama, biden)].max()


def test_batch_and_single_runs_agree(identity_embeds):
    rec, crops, batched, _ = identity_embeds
    single = torch.cat([rec.embed(crops[i:i + 1]) for i in (0, 5, 36)])
    torch.testing.assert_close(single, batched[[0, 5, 36]], atol=1e-4, rtol=1e-4)


def test_onnx_graph_reader_matches_onnxruntime(pack):
    ort = ifp.import_ort()
    for f in pack.glob("*.onnx"):
        sess = ort.InferenceSession(str(f), providers=["CPUExecutionProvider"])  # the file's own, dynamic shapes
        ins, n_out = ifp.onnx_io(f)
        assert n_out == len(sess.get_outputs())
        assert [d if isinstance(d, int) else "?" for d in ins[0]] == \
            [d if isinstance(d, int) else "?" for d in sess.get_inputs()[0].shape]
        assert ifp.classify_file(f) == ifp.classify(sess) == ifp.classify(ifp.make_session(f))
    # the pack opens SCRFD at FaceAnalysis's static 640 x 640 shape (bit-identical detections); the recogniser as is
    assert ifp.make_session(pack / "det_2.5g.onnx").get_inputs()[0].shape == [1, 3, 640, 640]
    rec = pack / "mobilefacenet_128.onnx"
    assert ifp.make_session(rec).get_inputs()[0].shape == \
        ort.InferenceSession(str(rec), providers=["CPUExecutionProvider"]).get_inputs()[0].shape
    assert ifp.classify_file(pack / "det_2.5g.onnx") == "detection"
    assert ifp.classify_file(pack / "mobilefacenet_128.onnx") == "recognition"
    assert ifp.recogniser_normalisation(pack / "mobilefacenet_128.onnx") == (127.5, 127.5)


def test_pack_layouts_and_messages(tmp_path, pack):
    root = tmp_path / "insightface"
    (root / "models/good").mkdir(parents=True)
    (root / "models/good/det.onnx").symlink_to(pack / "det_2.5g.onnx")
    (root / "models/nested/nested").mkdir(parents=True)  # the antelopev2 unzip mistake
    (root / "models/nested/nested/rec.onnx").symlink_to(pack / "mobilefacenet_128.onnx")
    (root / "models/empty").mkdir(parents=True)
    assert ifp.list_packs([root]) == ["good", "nested"]
    assert ifp.list_models([root], "detection") == ["good/det.onnx"]
    assert ifp.list_models([root], "recognition") == ["nested/rec.onnx"]
    assert ifp.resolve_model([root], "nested/rec.onnx") == root / "models/nested/nested/rec.onnx"
    with pytest.raises(FileNotFoundError, match="models/insightface/models/empty/"):
        ifp.find_pack([root], "empty")


@pytest.fixture(scope="module")
def facenet_file(tmp_path_factory):
    """A random Inception-ResNet-V1 in the VGGFace2 file's layout (with the 8631-way logits layer)."""
    from facenet_pytorch.models.inception_resnet_v1 import InceptionResnetV1

    torch.manual_seed(0)
    net = InceptionResnetV1(pretrained=None, classify=True, num_classes=8631)
    path = tmp_path_factory.mktemp("facenet") / "facenet_random.pt"
    torch.save(net.state_dict(), path)
    return path


def test_facenet_layers_shapes(facenet_file):
    fn = embed.load_facenet(facenet_file)
    crops = torch.rand(3, 160, 160, 3)
    e512 = fn.embed(crops, "bottleneck_512")
    e1792 = fn.embed(crops, "pooled_1792")
    assert e512.shape == (3, 512) and e1792.shape == (3, 1792)
    assert torch.isfinite(e512).all() and torch.isfinite(e1792).all()
    # the bottleneck is un-normalised; facenet-pytorch's own forward is its L2-normalised version
    with torch.no_grad():
        ref = fn.net((crops.permute(0, 3, 1, 2) * 255 - 127.5) / 128)
    torch.testing.assert_close(embed.l2_normalize(e512), ref, atol=1e-4, rtol=1e-4)
    assert fn.model_id("bottleneck_512") == "facenet-vggface2/bottleneck"


def test_facenet_refuses_a_wrong_state_dict(tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save({"conv.weight": torch.zeros(3)}, bad)
    with pytest.raises(ValueError, match="not an Inception-ResNet-V1"):
        embed.FaceNet(bad)
