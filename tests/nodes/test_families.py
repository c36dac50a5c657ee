"""The methods that work on SD2-base, SD2-v and SDXL, run on the tiny family checkpoints (marker ``family``:
scripts/test_hosts.sh runs them on the 0.28 host): Face0 inference through ProjectToContext with a projection of the
model's context width, IP-Adapter (an SD1.5 file refused with a family-true message; an SDXL adapter patching all
70 cross-attentions), FaceFusion's re-diffusion, and each node's native size."""

from __future__ import annotations

import os

import folder_paths
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import nodes
from facecond.nodes.face0.projection import ProjectToContext
from facecond.nodes.facechain.fusion import FacecondFaceFusion
from facecond.nodes.ipadapter.adapter import ApplyIPAdapter, IPAdapterEncode, LoadIPAdapter, cross_attention_layers
from facecond.nodes.model_family import family_name, native_resolution, resolve_resolution
from facecond.py.face0.projection import ProjectionInfo, random_projection
from facecond.py.faces.types import FaceEmbeds
from facecond_dev.random_weights import random_state_dict

D = 128
WIDTH = {"sd2": 1024, "sd2v": 1024, "sdxl": 2048}
NAMES = {"sd2": ("SD2", 512), "sd2v": ("SD2-v", 768), "sdxl": ("SDXL", 1024)}
SD15_LAYERS = [320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320, 1280]  # real SD1.5


def _embeds(n=1, seed=0):
    x = torch.nn.functional.normalize(torch.randn(n, D, generator=torch.Generator().manual_seed(seed)), dim=-1)
    return FaceEmbeds(embeds=x, model="test/embedder", normalized=True, source_index=tuple(range(n)))


def _one_step(model, positive, negative=None, seed=3):
    """One euler step at 64 px (cfg 1: the positive branch only)."""
    latent = nodes.EmptyLatentImage().generate(64, 64, 1)[0]
    with torch.inference_mode():
        return nodes.KSampler().sample(model, seed, 1, 1.0, "euler", "normal", positive, negative or positive,
                                       latent)[0]["samples"]


def _write_adapter(layer_dims, cross_dim, name):
    sd = random_state_dict("faceid", D, layer_dims, cross_dim=cross_dim, seed=1, scale=0.5)
    folder = folder_paths.get_folder_paths("ipadapter")[0]
    os.makedirs(folder, exist_ok=True)
    save_file(sd, os.path.join(folder, name))
    return LoadIPAdapter().load(name)[0]


def test_family_name_and_native_size(family, family_model):
    model = family_model[0]
    name, size = NAMES[family]
    assert family_name(model) == name and native_resolution(model) == size
    assert resolve_resolution(0, model, "Test") == size and resolve_resolution(96, model, "Test") == 96
    with pytest.raises(ValueError, match=r"Test: resolution 100 must be 0 \(the model.s native size\)"):
        resolve_resolution(100, model, "Test")


def test_face0_project_to_context_and_sample(family, family_model, family_cond):
    model, clip, _ = family_model
    before = family_cond[0][0].clone()
    proj = random_projection(ProjectionInfo(embedder="test/embedder", embed_dim=D, context_dim=WIDTH[family],
                                            base_model={"sdxl": "sdxl"}.get(family, "sd2")))
    pos, text_only, face_only, neg = ProjectToContext().project(family_cond, _embeds(), proj, clip, "each")
    tokens = proj(_embeds().embeds)[0]  # (3, W): for SDXL both halves, CLIP-L's 768 and CLIP-G's 1280 channels
    assert torch.equal(family_cond[0][0], before)  # the input conditioning is untouched
    torch.testing.assert_close(pos[0][0][0, -3:], tokens)  # the face: tokens 75-77 of the (last) chunk
    torch.testing.assert_close(face_only[0][0][0, 74:77], tokens)
    assert torch.count_nonzero(text_only[0][0][0, -3:]) == 0 and torch.count_nonzero(neg[0][0][0, 74:77]) == 0
    assert pos[0][1].get("pooled_output") is family_cond[0][1].get("pooled_output")  # pooled output untouched
    with_face, without = _one_step(model, pos), _one_step(model, text_only)
    assert torch.isfinite(with_face).all() and not torch.allclose(with_face, without)
    sd15 = random_projection(ProjectionInfo(embedder="test/embedder", embed_dim=D))
    with pytest.raises(ValueError, match=rf"context width {WIDTH[family]} .* 768-wide tokens .* trained for this"):
        ProjectToContext().project(family_cond, _embeds(), sd15, clip, "each")


def test_ipadapter_sd15_file_is_refused_naming_both_families(family, family_model):
    model = family_model[0]
    adapter = _write_adapter(SD15_LAYERS, 768, "ipa_family_test_sd15.safetensors")
    embeds = IPAdapterEncode().encode(adapter, "center", face_embeds=_embeds(2))[0]
    with pytest.raises(ValueError, match=rf"made for SD1.5 models \(16 cross-attention layers, context width 768\) "
                                         rf"but this model is {NAMES[family][0]} .*load a {NAMES[family][0]} "
                                         "IP-Adapter, or use a SD1.5 checkpoint"):
        ApplyIPAdapter().apply(model, adapter, embeds, 1.0, 0.0, 1.0)


@pytest.mark.parametrize("family", ["sdxl"], indirect=True)
def test_ipadapter_sdxl_adapter_patches_all_70_layers(family, family_model, family_cond):
    model = family_model[0]
    layers = cross_attention_layers(model)
    assert len(layers) == 70 and layers[-1][0][0] == "middle" and layers[0][0][0] == "input"  # diffusers' order
    assert {ctx for _, _, ctx in layers} == {2048}
    adapter = _write_adapter([inner for _, inner, _ in layers], 2048, "ipa_family_test_sdxl.safetensors")
    embeds = IPAdapterEncode().encode(adapter, "center", face_embeds=_embeds(2))[0]
    patched = ApplyIPAdapter().apply(model, adapter, embeds, 1.0, 0.0, 1.0)[0]
    zero = ApplyIPAdapter().apply(model, adapter, embeds, 0.0, 0.0, 1.0)[0]
    attn2 = patched.model_options["transformer_options"]["patches_replace"]["attn2"]
    assert len(attn2) == 70 and "patches_replace" not in model.model_options.get("transformer_options", {})
    reference = _one_step(model, family_cond)
    assert torch.equal(_one_step(zero, family_cond), reference)  # weight 0: bit-exact
    assert not torch.allclose(_one_step(patched, family_cond), reference)


def test_face_fusion_redraws_the_face(family, family_model, family_cond, shared_data, stand_in_models):
    from facecond_dev.face_photos import detect_faces, image_batch, letterbox, photo_array

    model, _, vae = family_model
    images = image_batch([letterbox(photo_array(shared_data, "obama/obama.jpg"), 160)])
    faces = detect_faces(images)
    out, mask, report = FacecondFaceFusion().fuse(
        model, family_cond, family_cond, vae, images, faces, seed=1, steps=1, cfg=1.0, sampler_name="euler",
        scheduler="normal", denoise=0.6, resolution=64, context=1.6, mask_shape="ellipse", feather=0.15)
    m = mask[0]
    assert "image 0: face 0 fused" in report and "at 64px" in report
    assert torch.equal(out[0][m == 0], images[0][m == 0])  # exact outside the mask
    assert float((out[0][m > 0.5] - images[0][m > 0.5]).abs().mean()) > 0.02  # the face was redrawn
    assert np.isfinite(out.numpy()).all()
