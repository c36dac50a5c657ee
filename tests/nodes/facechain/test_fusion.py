"""FaceChain's FaceFusion node (nodes/facechain/fusion.py) in-process on real photos (../shared/data/faces) and the
tiny SD1.5 checkpoint: re-diffusion of the face region, the template term, the swap model."""

import cv2
import numpy as np
import pytest
import torch

from facecond.nodes.facechain.chain import FacecondChooseTemplateFace
from facecond.nodes.facechain.fusion import FacecondFaceFusion
from facecond_dev.face_photos import detect_faces, embed_faces, image_batch, letterbox, photo_array

pytestmark = pytest.mark.usefixtures("one_torch_thread", "stand_in_models")


def test_fusion_changes_only_the_face_region(shared_data, tiny_model):
    model, clip, vae = tiny_model
    photo = letterbox(photo_array(shared_data, "obama/obama.jpg"), 192)
    blank = np.full((192, 192, 3), 0.3, np.float32)
    images = image_batch([photo, blank])
    before = images.clone()
    faces = detect_faces(images)
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
    e = embed_faces(replace(faces, crops_arcface=torch.from_numpy(crops)))
    return (e.embeds @ template_embeds.embeds[0]).numpy()


def test_fusion_with_the_template_moves_the_face_towards_it(shared_data, tiny_model):
    """Real photos: the template's face, warped onto each generated face and blended in, moves its embedding towards
    the template's. Measured at denoise 0 (the pixel step alone): the tiny random UNet overwrites any init at every
    denoise > 0 (with or without the template, cosines about -0.15..-0.24 here), so there only the path is checked."""
    model, clip, vae = tiny_model
    gen = image_batch([letterbox(photo_array(shared_data, n), 256) for n in
                  ("biden/biden.jpg", "johns/John_Salley/000179_02159509.jpg")])
    photos = image_batch([letterbox(photo_array(shared_data, "obama/obama.jpg"), 320)])
    template_faces = detect_faces(photos, no_face="error")
    template, template_image, _, _, _ = FacecondChooseTemplateFace().choose(template_faces, photos)
    template_embeds = embed_faces(template)
    faces = detect_faces(gen, no_face="error")
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
    gen = image_batch([letterbox(photo_array(shared_data, "biden/biden.jpg"), 256),
                       np.full((256, 256, 3), 0.4, np.float32)])
    faces = detect_faces(gen)
    photos = image_batch([letterbox(photo_array(shared_data, "obama/obama.jpg"), 320)])
    template_embeds = embed_faces(detect_faces(photos, no_face="error"))
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
    photos_faces = detect_faces(photos, no_face="error")
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
