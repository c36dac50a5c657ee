"""IP-Adapter FaceID Plus v2 and FaceID Portrait through the nodes, in-process on the tiny SD1.5 checkpoint: real
photos -> FaceDetectCrop (MTCNN keypoints) -> FaceEmbed (the 128-d test-pack recogniser standing in for buffalo_l)
-> IPAdapterEncode (face crop through ComfyUI's own ClipVisionModel, a tiny config: CLIPVisionLoader's detection only
knows full-size encoders, 300M+ parameters) -> ApplyIPAdapter, with random-weight files in the published key layout
sized for the tiny U-Net."""

from __future__ import annotations

import json
import os

import comfy.clip_vision
import folder_paths
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import nodes
from facecond.nodes.ipadapter.adapter import ApplyIPAdapter, IPAdapterEncode, LoadIPAdapter, cross_attention_layers
from facecond.nodes.ipadapter.aggregate import AggregateEmbeds
from facecond.py.ipadapter import face_crop
from facecond_dev import face_photos
from facecond_dev.random_weights import random_state_dict

CV_WIDTH = 32


@pytest.fixture(scope="module")
def clip_vision(tmp_path_factory):
    cfg = {"hidden_act": "quick_gelu", "hidden_size": CV_WIDTH, "image_size": 28, "intermediate_size": 64,
           "layer_norm_eps": 1e-5, "model_type": "clip_vision_model", "num_attention_heads": 2, "num_channels": 3,
           "num_hidden_layers": 3, "patch_size": 14, "projection_dim": 24}
    path = tmp_path_factory.mktemp("cv") / "cv.json"
    path.write_text(json.dumps(cfg))
    cv = comfy.clip_vision.ClipVisionModel(str(path))
    g = torch.Generator().manual_seed(0)
    cv.load_sd({k: torch.randn(v.shape, generator=g) * 0.1 for k, v in cv.get_sd().items()})
    return cv


@pytest.fixture(scope="module")
def photos(shared_data, stand_in_models, one_torch_thread):
    image = face_photos.image_batch([face_photos.letterbox(face_photos.photo_array(shared_data, f"obama/{n}"), 160)
                                     for n in ("obama.jpg", "obama2.jpg", "obama3.jpg")])
    faces = face_photos.detect_faces(image, no_face="skip")
    return image, faces, face_photos.embed_faces(faces)


def _adapter(model, kind, name, **kw):
    layers = cross_attention_layers(model)
    sd = random_state_dict(kind, 128, [inner for _, inner, _ in layers], cross_dim=layers[0][2], seed=4, scale=0.5,
                           **kw)
    folder = folder_paths.get_folder_paths("ipadapter")[0]
    os.makedirs(folder, exist_ok=True)
    if name.endswith(".bin"):  # the published .bin layout: nested image_proj / ip_adapter dicts
        torch.save({p: {k[len(p) + 1:]: v for k, v in sd.items() if k.startswith(p + ".")}
                    for p in ("image_proj", "ip_adapter")}, os.path.join(folder, name))
    else:
        save_file(sd, os.path.join(folder, name))
    return LoadIPAdapter().load(name)


def _sample(model, conds):
    with torch.inference_mode():
        latent = nodes.EmptyLatentImage().generate(64, 64, 1)[0]
        return nodes.KSampler().sample(model, 3, 2, 5.0, "euler", "normal", conds[0], conds[1], latent)[0]["samples"]


@pytest.fixture(scope="module")
def conds(tiny_model):
    with torch.inference_mode():
        return tuple(nodes.CLIPTextEncode().encode(tiny_model[1], t)[0] for t in ("a photo of a person", ""))


def test_face_crop_is_insightface_norm_crop(photos):
    from insightface.utils import face_align

    image, faces, _ = photos
    crops = face_crop.clip_face_crops(image, faces.landmarks, faces.source_index)
    assert crops.shape == (len(faces), 224, 224, 3)
    for i, src in enumerate(faces.source_index):
        u8 = (image[src].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        # float32 keypoints, as FaceAnalysis's face.kps are: skimage then estimates in float32
        ref = face_align.norm_crop(u8, landmark=np.asarray(faces.landmarks[i], np.float32), image_size=224)
        assert np.array_equal((crops[i].numpy() * 255).round().astype(np.uint8), ref)  # bit for bit


def test_faceid_plusv2_encode_apply_and_s_scale(tiny_model, conds, clip_vision, photos):
    model = tiny_model[0]
    image, faces, embeds = photos
    adapter, info = _adapter(model, "faceid_plus", "ip-adapter-faceid-plusv2_sd15.bin", depth=1, inner=64,
                             clip_dim=CV_WIDTH, lora_rank=4)
    assert adapter.variant.name == "faceid_plusv2" and "FaceID Plus v2 (" in info and "LoRA" in info
    ref = IPAdapterEncode()
    with pytest.raises(ValueError, match=r"IPAdapterEncode: .*FaceID Plus v2 .*connect face_embeds .*faces"):
        ref.encode(adapter, "center", image=image, clip_vision=clip_vision, face_embeds=embeds)
    emb, report = ref.encode(adapter, "center", image=image, clip_vision=clip_vision, face_embeds=embeds, faces=faces)
    n = len(faces)
    assert emb.kind == "face+clip_hidden" and emb.embeds.shape == (n, 128) and n >= 2
    assert emb.clip.shape == (n, 5, CV_WIDTH) and emb.clip_neg.shape == (1, 5, CV_WIDTH)
    assert f"{n} references (face+clip_hidden" in report
    one = AggregateEmbeds().aggregate(emb, "mean", "none", 0)[0]
    assert one.clip.shape == (1, 5, CV_WIDTH) and torch.allclose(one.clip[0], emb.clip.mean(0))
    base = _sample(model, conds)
    zero = ApplyIPAdapter().apply(model, adapter, one, 0.0, 0.0, 1.0, lora_strength=0.0)[0]
    assert torch.equal(_sample(zero, conds), base)  # weight 0, no LoRA: bit-identical
    late = ApplyIPAdapter().apply(model, adapter, one, 1.0, 1.0, 1.0, lora_strength=0.0)[0]
    assert torch.equal(_sample(late, conds), base)  # outside start-end: bit-identical
    full = ApplyIPAdapter().apply(model, adapter, one, 1.0, 0.0, 1.0, lora_strength=0.0)[0]
    half = ApplyIPAdapter().apply(model, adapter, one, 1.0, 0.0, 1.0, lora_strength=0.0, s_scale=0.3)[0]
    a, b = _sample(full, conds), _sample(half, conds)
    assert torch.isfinite(a).all() and (a - base).abs().max() > 1e-3 and (a - b).abs().max() > 1e-4
    key = ("input", 1, 0)
    t_full = full.model_options["transformer_options"]["patches_replace"]["attn2"][key].terms[0]
    t_half = half.model_options["transformer_options"]["patches_replace"]["attn2"][key].terms[0]
    assert t_full.k.shape == (1, 4, cross_attention_layers(model)[0][1]) and not torch.equal(t_full.k, t_half.k)
    # the LoRA: once per model, even when the node is applied again for the second region
    twice = ApplyIPAdapter().apply(ApplyIPAdapter().apply(model, adapter, one, 1.0, 0.0, 1.0)[0], adapter, one, 1.0,
                                   0.0, 1.0)[0]
    assert len(twice.patches) == len(ApplyIPAdapter().apply(model, adapter, one, 1.0, 0.0, 1.0)[0].patches) > 0
    assert all(len(p) == 1 for p in twice.patches.values())


def test_faceid_portrait_one_token_group_per_photo(tiny_model, conds, photos):
    model = tiny_model[0]
    _, faces, embeds = photos
    adapter, info = _adapter(model, "faceid", "ip-adapter-faceid-portrait_sd15.bin", tokens=16)
    assert adapter.variant.name == "faceid_portrait" and not adapter.lora and "FaceID Portrait" in info
    emb = IPAdapterEncode().encode(adapter, "center", face_embeds=embeds)[0]
    m = ApplyIPAdapter().apply(model, adapter, emb, 1.0, 0.0, 1.0)[0]
    term = m.model_options["transformer_options"]["patches_replace"]["attn2"][("input", 1, 0)].terms[0]
    assert term.k.shape[1] == 16 * len(faces)  # N photos side by side: N groups of 16 tokens
    mean = ApplyIPAdapter().apply(model, adapter, AggregateEmbeds().aggregate(emb, "mean", "none", 0)[0], 1.0, 0.0,
                                  1.0)[0]
    t_mean = mean.model_options["transformer_options"]["patches_replace"]["attn2"][("input", 1, 0)].terms[0]
    assert t_mean.k.shape[1] == 16
    out, out_mean = _sample(m, conds), _sample(mean, conds)
    assert torch.isfinite(out).all() and not torch.equal(out, out_mean)
