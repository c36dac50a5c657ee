"""FaceDetectCrop / FaceEmbed / FaceSimilarity in-process against real ComfyUI, on real photos and odd inputs."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from facecond.nodes.faces.detect_embed import FacecondFaceDetectCrop, FacecondFaceEmbed, FacecondFaceSimilarity
from facecond.py.faces.types import FaceEmbeds, Faces

REC = "testpack/mobilefacenet_128.onnx"
DET = "testpack/det_2.5g.onnx"


pytestmark = pytest.mark.usefixtures("one_torch_thread", "stand_in_models")


def _photo(shared_data, rel, size=None) -> torch.Tensor:
    im = Image.open(shared_data / "faces" / rel).convert("RGB")
    if size:
        im = im.resize(size)
    return torch.from_numpy(np.asarray(im, np.float32) / 255.0)[None]


def _detect(image, **kw):
    args = {"detector": "mtcnn", "select": "largest", "face_index": 0, "min_size": 40, "margin_scale": 1.0,
            "upright": "rotate_if_no_face", "no_face": "error", **kw}
    with torch.inference_mode():
        return FacecondFaceDetectCrop().detect(image, **args)


def test_schema_lists_the_pack_and_has_tooltips():
    for cls in (FacecondFaceDetectCrop, FacecondFaceEmbed, FacecondFaceSimilarity):
        spec = cls.INPUT_TYPES()
        for section in spec.values():
            for name, entry in section.items():
                assert entry[1].get("tooltip"), f"{cls.__name__}.{name} has no tooltip"
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES)
    assert DET in FacecondFaceDetectCrop.INPUT_TYPES()["required"]["detector"][0]
    assert REC in FacecondFaceEmbed.INPUT_TYPES()["required"]["model"][0]
    assert DET not in FacecondFaceEmbed.INPUT_TYPES()["required"]["model"][0]


def test_detect_embed_similarity_on_real_photos(shared_data):
    batch = torch.cat([_photo(shared_data, f"obama/{n}.jpg", (600, 700)) for n in ("obama", "obama2")]
                      + [_photo(shared_data, "biden/biden.jpg", (600, 700))])
    faces, preview, mask, c160, c112, report = _detect(batch)
    assert isinstance(faces, Faces) and faces.source_index == (0, 1, 2)
    assert preview.shape == batch.shape and mask.shape == batch.shape[:3] and c160.shape == (3, 160, 160, 3)
    assert c112.shape == (3, 112, 112, 3) and 0 < float(mask.mean()) < 0.5 and "3 face(s)" in report
    with torch.inference_mode():
        (emb,) = FacecondFaceEmbed().embed(faces, model=REC, facenet_layer="bottleneck_512", normalize="auto")
        table, heat, best = FacecondFaceSimilarity().compare(emb)
    assert isinstance(emb, FaceEmbeds) and emb.embeds.shape == (3, 128) and emb.normalized
    assert torch.allclose(emb.embeds.norm(dim=1), torch.ones(3), atol=1e-5)
    sim = emb.embeds @ emb.embeds.T
    assert sim[0, 1] > sim[0, 2] and sim[0, 1] > sim[1, 2]  # obama-obama above obama-biden
    assert abs(best - float(sim[0, 1])) < 1e-5 and "a0(img0)" in table and heat.shape[-1] == 3


def test_scrfd_detector_and_select_all(shared_data):
    img = _photo(shared_data, "astronaut/astronaut.png")
    faces, *_ = _detect(img, detector=DET, select="all")
    assert len(faces) == 1 and faces.detector == f"scrfd:{DET}"


def test_robust_inputs(shared_data):
    face = _photo(shared_data, "astronaut/astronaut.png")  # (1, 512, 512, 3)
    rgba = torch.cat([face, torch.ones_like(face[..., :1])], -1)
    assert len(_detect(rgba)[0]) == 1
    grey = face.mean(-1, keepdim=True)
    assert len(_detect(grey)[0]) == 1
    assert len(_detect(face * 65535.0)[0]) == 1  # 16-bit-like range
    tiny = torch.rand(1, 32, 32, 3)
    with pytest.raises(ValueError, match=r"FaceDetectCrop: no face found in image 0 of 1 \(min_size=40"):
        _detect(tiny)
    faces, preview, *_ = _detect(tiny, no_face="passthrough")
    assert len(faces) == 1 and faces.scores[0] == 0 and preview.shape == tiny.shape
    nan = face.clone()
    nan[0, 5, 5, 0] = float("nan")
    with pytest.raises(ValueError, match="input 'image' has NaN or infinite pixels in image"):
        _detect(nan)
    big = torch.nn.functional.interpolate(face.permute(0, 3, 1, 2), size=(3000, 4000), mode="bilinear")
    faces, preview, mask, *_ = _detect(big.permute(0, 2, 3, 1), min_size=200)
    assert len(faces) == 1 and mask.shape == (1, 3000, 4000)


def test_mixed_batch_policies(shared_data):
    face = _photo(shared_data, "astronaut/astronaut.png")
    batch = torch.cat([face, torch.full_like(face, 0.5), face, torch.zeros_like(face)])
    with pytest.raises(ValueError, match=r"no face found in image 1 of 4 .*no_face='skip'"):
        _detect(batch, upright="off")
    faces, _, _, _, _, report = _detect(batch, upright="off", no_face="skip")
    assert faces.source_index == (0, 2) and faces.skipped == (1, 3) and "image 3: no face (skipped)" in report
    faces, *_ = _detect(batch, upright="off", no_face="passthrough")
    assert faces.source_index == (0, 1, 2, 3) and faces.scores.tolist()[1] == 0.0


def test_embed_and_similarity_errors(shared_data):
    faces, *_ = _detect(_photo(shared_data, "astronaut/astronaut.png"))
    with pytest.raises(ValueError, match="is a detection model, not a face recogniser"):
        FacecondFaceEmbed().embed(faces, model=DET, facenet_layer="bottleneck_512", normalize="auto")
    with pytest.raises(FileNotFoundError, match="insightface pack 'nopack' not found"):
        FacecondFaceEmbed().embed(faces, model="nopack/x.onnx", facenet_layer="bottleneck_512", normalize="auto")
    a = FaceEmbeds(torch.randn(2, 128), "x", False, (0, 1))
    b = FaceEmbeds(torch.randn(2, 512), "y", False, (0, 1))
    with pytest.raises(ValueError, match="only embeddings of one model compare"):
        FacecondFaceSimilarity().compare(a, b)


def test_facenet_user_file(comfy_base, shared_data):
    """A FaceNet state dict in models/facenet (random weights: the real ones cannot be downloaded here)."""
    from facenet_pytorch.models.inception_resnet_v1 import InceptionResnetV1

    path = comfy_base / "models/facenet/facenet_random_test.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(InceptionResnetV1(pretrained=None, classify=True, num_classes=8631).state_dict(), path)
    try:
        assert "facenet/facenet_random_test.pt" in FacecondFaceEmbed.INPUT_TYPES()["required"]["model"][0]
        faces, *_ = _detect(_photo(shared_data, "astronaut/astronaut.png"))
        with torch.inference_mode():
            for layer, dim in (("bottleneck_512", 512), ("pooled_1792", 1792)):
                (emb,) = FacecondFaceEmbed().embed(faces, model="facenet/facenet_random_test.pt",
                                                   facenet_layer=layer, normalize="auto")
                assert emb.embeds.shape == (1, dim) and not emb.normalized and emb.model.startswith("facenet-vggface2/")
    finally:
        path.unlink()


def test_published_pack_is_listed_and_missing_one_says_where_and_url(shared_data, monkeypatch):
    assert "buffalo_l/w600k_r50.onnx" in FacecondFaceEmbed.INPUT_TYPES()["required"]["model"][0]
    assert "antelopev2/scrfd_10g_bnkps.onnx" in FacecondFaceDetectCrop.INPUT_TYPES()["required"]["detector"][0]
    monkeypatch.setenv("FACECOND_OFFLINE", "1")
    faces = _detect(_photo(shared_data, "obama/obama.jpg", (600, 700)))[0]
    msg = r"(?s)FaceEmbed.*insightface/releases/download/v0\.7/buffalo_l\.zip.*models/insightface/models/buffalo_l"
    with pytest.raises(Exception, match=msg):
        with torch.inference_mode():
            FacecondFaceEmbed().embed(faces, "buffalo_l/w600k_r50.onnx", "bottleneck_512", "auto")


def test_known_pack_file_with_wrong_bytes_is_refused(comfy_base, shared_data):
    """A file at a published pack's path that is not the published file: refused with path and expected hash."""
    fake = comfy_base / "models/insightface/models/buffalo_l"
    fake.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shared_data / "models/insightface_testpack/mobilefacenet_128.onnx", fake / "w600k_r50.onnx")
    try:
        faces = _detect(_photo(shared_data, "obama/obama.jpg", (600, 700)))[0]
        with pytest.raises(Exception, match=r"(?s)w600k_r50\.onnx.*4c06341c"):
            with torch.inference_mode():
                FacecondFaceEmbed().embed(faces, "buffalo_l/w600k_r50.onnx", "bottleneck_512", "auto")
    finally:
        shutil.rmtree(fake)


def test_preprocess_widget_default_and_insightface_mode(comfy_base, shared_data):
    """The appended optional widget: absent = facecond (shipped workflows keep their results, bit for bit);
    insightface = FaceAnalysis's pipeline, checked through both nodes against insightface itself on the
    test pack in ComfyUI's own models/insightface folder."""
    from facecond_dev import host

    spec = FacecondFaceDetectCrop.INPUT_TYPES()["optional"]["preprocess"]
    assert spec[0] == ["facecond", "insightface"] and spec[1]["default"] == "facecond"
    img = _photo(shared_data, "obama/obama.jpg")  # 1137 x 910: the face shrinks ~3x into the 112 crop
    kw = {"detector": DET, "upright": "off"}
    default, explicit, exact = _detect(img, **kw), _detect(img, preprocess="facecond", **kw), \
        _detect(img, preprocess="insightface", **kw)
    assert default[0].preprocess == "facecond" and exact[0].preprocess == "insightface"
    for a, b in zip(default, explicit):
        assert a == b if isinstance(a, str) else torch.equal(a, b) if torch.is_tensor(a) else \
            torch.equal(a.crops_arcface, b.crops_arcface) and torch.equal(a.boxes, b.boxes)
    box_shift = float((default[0].boxes - exact[0].boxes).abs().max())
    assert 0 < box_shift < 3  # the detector's input resize moves the box a little
    assert (default[0].crops_arcface - exact[0].crops_arcface).abs().max() > 0.05  # the 112 crop more
    assert torch.equal(exact[0].crops_arcface * 255, (exact[0].crops_arcface * 255).round())  # uint8 pixels
    with torch.inference_mode():
        vecs = {name: FacecondFaceEmbed().embed(out[0], REC, "bottleneck_512", "auto")[0].embeds[0].numpy()
                for name, out in (("facecond", default), ("insightface", exact))}
    with pytest.raises(ValueError, match=r"FaceDetectCrop: preprocess 'exact' is not one of"):
        _detect(img, preprocess="exact", **kw)

    if not host.data_required():
        pytest.importorskip("insightface", reason="insightface is the reference for this check")
    from insightface.app import FaceAnalysis

    app = FaceAnalysis(name="testpack", root=str(comfy_base / "models" / "insightface"),
                       providers=["CPUExecutionProvider"])
    app.prepare(ctx_id=-1, det_size=(640, 640))
    rgb = np.asarray(Image.open(shared_data / "faces/obama/obama.jpg").convert("RGB"))
    (ref,) = app.get(np.ascontiguousarray(rgb[:, :, ::-1]))
    cos = {k: float(v @ ref.normed_embedding) for k, v in vecs.items()}
    assert cos["insightface"] >= 0.9999 and cos["facecond"] < 0.995, cos
