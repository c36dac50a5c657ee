"""FaceChain nodes in-process against real ComfyUI objects, on real photos (../shared/data/faces) and the tiny
SD1.5 checkpoint: template choice, similarity ranking, face fusion and preprocessing."""

import itertools
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from facecond.nodes.facechain import FacecondChooseTemplateFace, FacecondFaceChainPreprocess, FacecondRankBySimilarity
from facecond.nodes.facechain_fusion import FacecondFaceFusion
from facecond.nodes.faces import FacecondFaceDetectCrop, FacecondFaceEmbed
from facecond.py.faces import crop
from facecond.py.faces.align import transform_points
from facecond.py.faces.types import Faces

REC = "testpack/mobilefacenet_128.onnx"


pytestmark = pytest.mark.usefixtures("one_torch_thread", "stand_in_models")


def _arr(shared_data, rel) -> np.ndarray:
    return np.asarray(Image.open(shared_data / "faces" / rel).convert("RGB"), np.float32) / 255.0


def _letterbox(a: np.ndarray, side: int) -> np.ndarray:
    """Fit into side x side keeping the aspect, centred on black."""
    h, w = a.shape[:2]
    f = side / max(h, w)
    r = np.clip(cv2.resize(a, (round(w * f), round(h * f)), interpolation=cv2.INTER_AREA), 0.0, 1.0)
    out = np.zeros((side, side, 3), np.float32)
    y, x = (side - r.shape[0]) // 2, (side - r.shape[1]) // 2
    out[y:y + r.shape[0], x:x + r.shape[1]] = r
    return out


def _batch(arrs) -> torch.Tensor:
    return torch.from_numpy(np.stack(arrs).astype(np.float32))


def _detect(image, no_face="passthrough", **kw):
    args = {"detector": "mtcnn", "select": "largest", "face_index": 0, "min_size": 40, "margin_scale": 1.0,
            "upright": "rotate_if_no_face", "no_face": no_face, **kw}
    with torch.inference_mode():
        return FacecondFaceDetectCrop().detect(image, **args)[0]


def _embed(faces):
    with torch.inference_mode():
        return FacecondFaceEmbed().embed(faces, model=REC, facenet_layer="bottleneck_512", normalize="auto")[0]


def test_choose_template_prefers_the_frontal_sharp_photo(shared_data):
    full = _arr(shared_data, "obama/obama.jpg")  # 1137 x 910
    h, w = full.shape[:2]
    pad = lambda a, left: np.pad(a, ((0, 0), (w - a.shape[1], 0) if left else (0, w - a.shape[1]), (0, 0)))  # noqa: E731
    partial = pad(_arr(shared_data, "obama/obama_partial_face.jpg"), left=False)  # face cut by the left edge
    partial2 = pad(_arr(shared_data, "obama/obama_partial_face2.jpg"), left=True)  # by the right edge
    blurred = cv2.GaussianBlur(full, (0, 0), 3.0)
    small = [np.clip(cv2.resize(a, (w // 2, h // 2), interpolation=cv2.INTER_AREA), 0, 1)
             for a in (blurred, partial, full, partial2)]
    image = _batch(small)
    before = image.clone()
    faces = _detect(image, no_face="error")
    template, photo, crop112, report, index = FacecondChooseTemplateFace().choose(faces, image)
    assert index == 2 and torch.equal(photo[0], image[2]), report
    assert isinstance(template, Faces) and len(template) == 1 and template.source_index == (0,)
    assert template.num_images == 1 and crop112.shape == (1, 112, 112, 3)
    assert report.splitlines()[0] == "template: face 2 (image 2)" and len(report.splitlines()) == 5
    assert torch.equal(image, before)
    with pytest.raises(ValueError, match="ChooseTemplateFace: 'faces' were found in 4 image"):
        FacecondChooseTemplateFace().choose(faces, image[:2])


def test_ranking_order_matches_cosine_order_on_real_photos(shared_data):
    template_img = _batch([_letterbox(_arr(shared_data, "obama/obama.jpg"), 400)])
    names = ["biden/biden.jpg", "obama/obama2.jpg", "johns/John_Salley/000179_02159509.jpg", "obama/obama3.jpg",
             None, "astronaut/astronaut.png"]
    gen = _batch([_letterbox(_arr(shared_data, n), 400) if n else np.full((400, 400, 3), 0.5, np.float32)
                  for n in names])
    template = _embed(_detect(template_img, no_face="error"))
    faces = _detect(gen)
    embeds = _embed(faces)
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
    skip_faces = _detect(gen, no_face="skip")
    _, _, s2, _, order2 = node.rank(gen, _embed(skip_faces), template, 3, 0.0)
    assert order2 == expected and s2[-1] == -1.0


def test_fusion_changes_only_the_face_region(shared_data, tiny_model):
    model, clip, vae = tiny_model
    photo = _letterbox(_arr(shared_data, "obama/obama.jpg"), 192)
    blank = np.full((192, 192, 3), 0.3, np.float32)
    images = _batch([photo, blank])
    before = images.clone()
    faces = _detect(images)
    with torch.inference_mode():
        positive = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a man"))
        negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    out, mask, report = FacecondFaceFusion().fuse(
        model, positive, negative, vae, images, faces, seed=1, steps=2, cfg=5.0, sampler_name="euler",
        scheduler="normal", denoise=0.6, resolution=64, context=1.6, mask_shape="ellipse", feather=0.15)
    assert torch.equal(images, before)  # inputs untouched
    assert out.shape == images.shape and mask.shape == images.shape[:3]
    assert torch.equal(out[1], images[1]) and float(mask[1].abs().max()) == 0.0  # no face: passed through
    assert "image 1: no face, passed through unchanged" in report and "image 0: face 0 fused" in report
    m = mask[0]
    outside = m == 0
    assert torch.equal(out[0][outside], images[0][outside])  # bit-identical outside the feathered mask
    inside = m > 0.5
    assert float((out[0][inside] - images[0][inside]).abs().mean()) > 0.02  # the face was redrawn
    # the mask covers the face, not the image: inside the detector box grown by half, a few % of the image
    x1, y1, x2, y2 = faces.boxes[0].tolist()
    gw, gh = (x2 - x1) / 2, (y2 - y1) / 2
    ys, xs = torch.nonzero(m > 0, as_tuple=True)
    assert xs.min() >= x1 - gw and xs.max() <= x2 + gw and ys.min() >= y1 - gh and ys.max() <= y2 + gh
    assert 0.01 < float((m > 0).float().mean()) < 0.3
    # square mask: also exact outside
    out_sq, mask_sq, _ = FacecondFaceFusion().fuse(
        model, positive, negative, vae, images, faces, seed=1, steps=1, cfg=5.0,
        sampler_name="euler", scheduler="normal", denoise=0.5, resolution=64, context=1.6, mask_shape="square",
        feather=0.1)
    assert torch.equal(out_sq[0][mask_sq[0] == 0], images[0][mask_sq[0] == 0])


def test_preprocess_turns_faces_upright_and_centres_them(shared_data):
    obama = _letterbox(_arr(shared_data, "obama/obama.jpg"), 320)
    sideways = np.ascontiguousarray(np.rot90(obama, 1))  # face lying on its side
    tilted = cv2.warpAffine(obama, cv2.getRotationMatrix2D((160, 160), 25, 1.0), (320, 320))
    blank = np.full((320, 320, 3), 0.5, np.float32)
    image = _batch([sideways, tilted, blank])
    faces = _detect(image)
    res = 160
    out, mask, report = FacecondFaceChainPreprocess().prepare(image, faces, res, 2.0, "ellipse", "keep")
    assert out.shape == (2, res, res, 3) and mask.shape == (2, res, res), report
    assert "photo 2: no face, dropped" in report
    assert float(mask[0, res // 2, res // 2]) == 1.0 and float(mask[0, 2, 2]) == 0.0
    again = _detect(out, no_face="error", upright="off")  # found without turning: the crops are upright
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
    image = _batch([_letterbox(_arr(shared_data, "obama/obama.jpg"), 640)])
    faces = _detect(image, no_face="error")
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


@pytest.fixture(scope="module")
def genderage_packs(stand_in_models):
    """Two stand-in genderage models in the in-process base: a man of 34.6 and a girl of 8 (constant outputs)."""
    from facecond_dev.onnx_standins import genderage_model

    root = stand_in_models / "models/insightface/models"
    genderage_model(root / "ga_man/genderage.onnx", 0.2, 0.8, 34.6)
    genderage_model(root / "ga_girl/genderage.onnx", 0.7, 0.3, 8.0)
    return root


def _tag_inputs(shared_data):
    photos = [_letterbox(_arr(shared_data, "obama/obama.jpg"), 320), np.full((320, 320, 3), 0.5, np.float32),
              _letterbox(_arr(shared_data, "biden/biden.jpg"), 320)]
    image = _batch(photos)
    faces = _detect(image)
    crops, _, _ = FacecondFaceChainPreprocess().prepare(image, faces, 64, 2.0, "ellipse", "keep")
    return image, faces, crops


def test_tag_faces_captions_dataset_and_steps(shared_data, genderage_packs):
    import json

    import folder_paths

    from facecond.nodes.facechain_tagging import AUTO, FacecondFaceChainTagFaces

    choices = FacecondFaceChainTagFaces.INPUT_TYPES()["required"]["genderage_model"][0]
    assert {"ga_man/genderage.onnx", "ga_girl/genderage.onnx", "buffalo_l/genderage.onnx"} <= set(choices)
    image, faces, crops = _tag_inputs(shared_data)
    assert crops.shape[0] == 2  # the grey photo has no face
    out = Path(folder_paths.get_output_directory()) / "facechain_test/person"
    out.mkdir(parents=True, exist_ok=True)
    (out / "0007.png").write_bytes(b"stale")  # from an earlier, larger set: removed
    (out / "notes.txt").write_text("mine")  # not a dataset name: kept
    before = crops.clone()
    captions, prompt, steps, report = FacecondFaceChainTagFaces().tag(
        crops, image, faces, "ga_man/genderage.onnx", AUTO, "sks", "facechain_test/person", 20, 1)
    # p_male 0.8 > p_female 0.2 for both faces; age round(34.6) = 35 -> bin 30-39 -> FaceChain's 'a handsome man'
    assert captions == ["sks, a handsome man"] * 2 and prompt == "sks, a handsome man"
    assert steps == 40  # 2 photos x 20 epochs at batch 1
    # row 1 is the grey photo's passthrough stand-in
    assert "face 0 (photo 0): male, age 35" in report and "face 2 (photo 2): male, age 35" in report
    assert sorted(p.name for p in out.iterdir()) == ["0000.png", "0000.txt", "0001.png", "0001.txt",
                                                     "metadata.jsonl", "notes.txt"]
    assert (out / "0001.txt").read_text() == "sks, a handsome man"
    png = np.asarray(Image.open(out / "0001.png"), np.float32) / 255
    assert png.shape == (64, 64, 3) and np.abs(png - crops[1].numpy()).max() <= 1 / 255 + 1e-6
    meta = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert meta == [{"file_name": "0000.png", "text": "sks, a handsome man"},
                    {"file_name": "0001.png", "text": "sks, a handsome man"}]
    assert torch.equal(crops, before)
    # a girl of 8: 'a girl' plus FaceChain's 'children' tag; 3 epochs at batch 4 -> ceil(6 / 4) = 2 steps
    captions, prompt, steps, _ = FacecondFaceChainTagFaces().tag(
        crops, image, faces, "ga_girl/genderage.onnx", AUTO, "<sks>", "", 3, 4)
    assert captions == ["<sks>, a girl, children"] * 2 and steps == 2


def test_tag_faces_by_hand_and_bad_inputs(shared_data, genderage_packs, monkeypatch):
    from facecond.nodes.facechain_tagging import AUTO, FacecondFaceChainTagFaces

    image, faces, crops = _tag_inputs(shared_data)
    node = FacecondFaceChainTagFaces()
    # a word picked by hand needs no model (the published entry is not installed here)
    captions, _, _, report = node.tag(crops, image, faces, "buffalo_l/genderage.onnx", "a mature woman", "sks",
                                           "", 20, 1)
    assert captions == ["sks, a mature woman"] * 2 and "set by hand" in report
    monkeypatch.setenv("FACECOND_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"FaceChainTagFaces: genderage_model 'buffalo_l/genderage.onnx' is not "
                                         r"installed .*models/insightface/models/buffalo_l/"):
        node.tag(crops, image, faces, "buffalo_l/genderage.onnx", AUTO, "sks", "", 20, 1)
    with pytest.raises(ValueError, match=r"is a recognition model, not insightface's genderage"):
        node.tag(crops, image, faces, REC, AUTO, "sks", "", 20, 1)
    with pytest.raises(ValueError, match="'images' holds 1 image"):
        node.tag(crops[:1], image, faces, "ga_man/genderage.onnx", AUTO, "sks", "", 20, 1)
    with pytest.raises(ValueError, match=r"FaceChainTagFaces: dataset_name '\.\./escape'"):
        node.tag(crops, image, faces, "ga_man/genderage.onnx", AUTO, "sks", "../escape", 20, 1)


def test_tag_faces_reads_a_sideways_face_upright(shared_data, stand_in_models):
    """A photo turned on its side gives (nearly) the numbers of the upright photo: FaceDetectCrop finds the face
    by turning the photo, and the genderage crop is turned upright by the quarter turn of the aligned crop. The
    stand-in model's output depends on every input pixel (random weights)."""
    from facecond.nodes.facechain_tagging import AUTO, FacecondFaceChainTagFaces
    from facecond_dev.onnx_standins import genderage_model

    genderage_model(stand_in_models / "models/insightface/models/ga_pixels/genderage.onnx", 0.5, 0.5, 30,
                    weight_scale=2e-3, seed=3)
    upright = _letterbox(_arr(shared_data, "obama/obama.jpg"), 320)
    image = _batch([upright, np.ascontiguousarray(np.rot90(upright, 1))])
    faces = _detect(image, no_face="error")
    crops, _, _ = FacecondFaceChainPreprocess().prepare(image, faces, 64, 2.0, "ellipse", "keep")
    report = FacecondFaceChainTagFaces().tag(crops, image, faces, "ga_pixels/genderage.onnx", AUTO, "sks", "", 20,
                                             1)[3]
    p = [[float(v) for v in re.findall(r"p_(?:female|male) (-?[0-9.]+)", line)] for line in report.splitlines()
         if line.startswith("face ")]
    assert len(p) == 2 and abs(p[0][0] - 0.5) > 0.02, report  # the pixels moved the output
    assert np.allclose(p[0], p[1], atol=0.02), report  # same face, same reading


def _fusion_args(**kw):
    args = {"seed": 1, "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 0.3,
            "resolution": 128, "context": 1.6, "mask_shape": "ellipse", "feather": 0.15}
    return {**args, **kw}


def _cosines(fused, faces, template_embeds):
    """Cosine with the template of each face of ``faces`` recut from the fused images at its own alignment (the
    tiny random model's re-diffusion leaves faces MTCNN may not find again)."""
    from dataclasses import replace

    from facecond.py.faces.align import warp_crop

    crops = np.stack([warp_crop(fused[faces.source_index[r]].numpy(), faces.affine_arcface[r].numpy(), 112)
                      for r in range(len(faces))])
    e = _embed(replace(faces, crops_arcface=torch.from_numpy(crops)))
    return (e.embeds @ template_embeds.embeds[0]).numpy()


def test_fusion_with_the_template_moves_the_face_towards_it(shared_data, tiny_model):
    """Real photos: the template's face, warped onto each generated face and blended in, moves its embedding towards
    the template's. Measured at denoise 0 (the pixel step alone): the tiny random UNet overwrites any init at every
    denoise > 0 (with or without the template, cosines about -0.15..-0.24 here), so there only the path is checked."""
    model, clip, vae = tiny_model
    gen = _batch([_letterbox(_arr(shared_data, n), 256) for n in
                  ("biden/biden.jpg", "johns/John_Salley/000179_02159509.jpg")])
    photos = _batch([_letterbox(_arr(shared_data, "obama/obama.jpg"), 320)])
    template, template_image, _, _, _ = FacecondChooseTemplateFace().choose(_detect(photos, no_face="error"), photos)
    template_embeds = _embed(template)
    faces = _detect(gen, no_face="error")
    with torch.inference_mode():
        positive = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a man"))
        negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    node = FacecondFaceFusion()
    before = gen.clone()
    args = _fusion_args(denoise=0.0)
    plain, mask0, report0 = node.fuse(model, positive, negative, vae, gen, faces, **args)
    assert torch.equal(plain, gen) and float(mask0.max()) == 0.0  # denoise 0 and no template: nothing to do
    assert "unchanged: denoise 0, no template" in report0, report0
    fused, mask1, report = node.fuse(model, positive, negative, vae, gen, faces, **args, template=template,
                                     template_image=template_image, template_strength=0.5)
    strong, _, _ = node.fuse(model, positive, negative, vae, gen, faces, **args, template=template,
                             template_image=template_image, template_strength=0.8)
    aligned, _, _ = node.fuse(model, positive, negative, vae, gen, faces, **args, template=template,
                              template_strength=0.8)  # the 112-px aligned crop alone
    assert torch.equal(gen, before)
    assert "template strength 0.5" in report.splitlines()[0] and "fused (template 0.5;" in report, report
    c_plain, c_fused, c_strong, c_aligned = (_cosines(x, faces, template_embeds)
                                             for x in (plain, fused, strong, aligned))
    msg = f"without template {c_plain}, strength 0.5 {c_fused}, 0.8 {c_strong}, 0.8 aligned crop only {c_aligned}"
    assert np.all(c_fused > c_plain + 0.15) and np.all(c_strong > c_fused + 0.1), msg
    assert np.all(c_aligned > c_plain + 0.15), msg
    outside = mask1 == 0  # pixels outside the mask untouched
    assert outside.sum() > 0.5 * outside.numel() and torch.equal(fused[outside], gen[outside])
    # with re-diffusion the blended crop is the sampler's start: a different init, a different result; strength 0
    # with a template is the plain re-diffusion, bit for bit
    args = _fusion_args(denoise=0.3)
    plain_d, _, _ = node.fuse(model, positive, negative, vae, gen, faces, **args)
    fused_d, mask_d, report_d = node.fuse(model, positive, negative, vae, gen, faces, **args, template=template,
                                          template_image=template_image, template_strength=0.5)
    zero_d, _, _ = node.fuse(model, positive, negative, vae, gen, faces, **args, template=template,
                             template_image=template_image, template_strength=0.0)
    assert "template 0.5, re-diffused" in report_d and torch.equal(zero_d, plain_d)
    assert float((fused_d - plain_d).abs().max()) > 0.01  # measured 0.043
    assert torch.equal(fused_d[mask_d == 0], gen[mask_d == 0])
    with pytest.raises(ValueError, match="FaceFusion: 'template_image' is connected but 'template' is not"):
        node.fuse(model, positive, negative, vae, gen, faces, **args, template_image=template_image)
    with pytest.raises(ValueError, match="FaceFusion: 'template' was found in 1 image"):
        node.fuse(model, positive, negative, vae, gen, faces, **args, template=template, template_image=gen)


def test_fusion_swap_model_pastes_the_stand_ins_output(shared_data, tiny_model, stand_in_models):
    """An inswapper-signature stand-in (output 0.5 (1 - target) + 0.5 sigmoid(source . v)) in models/insightface:
    with denoise 0 and no template blend, the fused face is exactly the stand-in's output inside the mask."""
    from facecond_dev import stand_in_swap

    pytest.importorskip("onnx")
    folder = stand_in_models / "models" / "insightface"
    written = [stand_in_swap.write_stand_in(folder / "inswapper_stand_in.onnx", embed_dim=128, seed=5),
               stand_in_swap.write_stand_in(folder / "inswapper_512.onnx", embed_dim=512, seed=5)]
    try:
        _check_swap(shared_data, tiny_model)
    finally:  # other tests list the folder's models
        for p in written:
            p.unlink()


def _check_swap(shared_data, tiny_model):
    from facecond.py.facechain import swap
    from facecond_dev import stand_in_swap

    choices = FacecondFaceFusion.INPUT_TYPES()["optional"]["swap_model"][0]
    assert choices[0] == "none" and {"inswapper_stand_in.onnx", "inswapper_512.onnx"} <= set(choices)
    assert not any("mobilefacenet" in c for c in choices)  # recognisers are not swap models
    model, clip, vae = tiny_model
    gen = _batch([_letterbox(_arr(shared_data, "biden/biden.jpg"), 256), np.full((256, 256, 3), 0.4, np.float32)])
    faces = _detect(gen)
    photos = _batch([_letterbox(_arr(shared_data, "obama/obama.jpg"), 320)])
    template_embeds = _embed(_detect(photos, no_face="error"))
    with torch.inference_mode():
        positive = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a man"))
        negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    node = FacecondFaceFusion()
    out, mask, report = node.fuse(model, positive, negative, vae, gen, faces, **_fusion_args(denoise=0.0),
                                  template_embeds=template_embeds, swap_model="inswapper_stand_in.onnx")
    assert "image 0: face 0 fused (swapped;" in report and "image 1: no face" in report, report
    # by hand: the 128 crop through T(8, 0) o A, the stand-in's formula, warped back
    img = gen[0].numpy()
    m = faces.affine_arcface[0].numpy().astype(np.float64).copy()
    m[0, 2] += 8.0
    crop128 = cv2.warpAffine(img, m, (128, 128), flags=cv2.INTER_LINEAR, borderValue=0)
    v, emap = stand_in_swap.stand_in_tensors(128, seed=5)
    e = template_embeds.embeds[0].numpy().astype(np.float64)
    lat = (e / np.linalg.norm(e)) @ emap.astype(np.float64)
    want = np.clip(stand_in_swap.expected_output(crop128, lat / np.linalg.norm(lat), v), 0, 1)
    back = cv2.warpAffine(want, m, (256, 256), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)
    a = mask[0].numpy()
    full, zero = a == 1.0, a == 0.0
    assert full.sum() > 100 and np.allclose(out[0].numpy()[full], back[full], atol=1e-5)  # the stand-in's output
    assert np.allclose(out[0].numpy(), img * (1 - a[..., None]) + back * a[..., None], atol=1e-5)  # and the edge
    assert np.array_equal(out[0].numpy()[zero], img[zero]) and torch.equal(out[1], gen[1])
    # the same mask is the alpha of the swap alone: its 128-px ellipse, warped back
    alpha = cv2.warpAffine(swap.swap_mask(0.15), m, (256, 256), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)
    assert np.allclose(a, np.clip(alpha, 0, 1), atol=1e-6)
    # swap + template + re-diffusion runs; outside the combined mask still untouched
    photos_faces = _detect(photos, no_face="error")
    out2, mask2, report2 = node.fuse(model, positive, negative, vae, gen, faces, **_fusion_args(),
                                     template=photos_faces, template_image=photos, template_embeds=template_embeds,
                                     swap_model="inswapper_stand_in.onnx")
    assert "swapped, template 0.5, re-diffused" in report2, report2
    assert torch.equal(out2[0][mask2[0] == 0], gen[0][mask2[0] == 0])
    with pytest.raises(ValueError, match=r"FaceFusion: swap_model 'inswapper_stand_in\.onnx' needs 'template_embeds'"):
        node.fuse(model, positive, negative, vae, gen, faces, **_fusion_args(), swap_model="inswapper_stand_in.onnx")
    with pytest.raises(ValueError, match="FaceFusion: input 'template_embeds' holds 128-d embeddings"):
        node.fuse(model, positive, negative, vae, gen, faces, **_fusion_args(), template_embeds=template_embeds,
                  swap_model="inswapper_512.onnx")
    with pytest.raises(FileNotFoundError, match=r"FaceFusion: swap model 'gone\.onnx' not found"):
        node.fuse(model, positive, negative, vae, gen, faces, **_fusion_args(), template_embeds=template_embeds,
                  swap_model="gone.onnx")
