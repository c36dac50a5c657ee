"""IP-Adapter nodes in-process on the tiny SD1.5 checkpoint, with tiny random IP-Adapter files written at test
time in the real key layout and a tiny CLIP-vision model built by ComfyUI's own ClipVisionModel class."""

from __future__ import annotations

import copy
import json
import os

import comfy.clip_vision
import folder_paths
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import nodes
from facecond.nodes.ipadapter.adapter import (
    ApplyIPAdapter,
    IPAdapterEncode,
    LoadIPAdapter,
    cross_attention_layers,
)
from facecond.nodes.ipadapter.aggregate import AggregateEmbeds
from facecond.py.faces.types import FaceEmbeds
from facecond.py.ipadapter import aggregate as agg
from facecond_dev.random_weights import random_state_dict

STEPS = 3
D = 128


def _write_adapter(model, kind, width, name):
    layers = cross_attention_layers(model)
    sd = random_state_dict(kind, width, [inner for _, inner, _ in layers], cross_dim=layers[0][2], seed=1,
                               scale=0.5)
    folder = folder_paths.get_folder_paths("ipadapter")[0]
    os.makedirs(folder, exist_ok=True)
    save_file(sd, os.path.join(folder, name))
    assert name in LoadIPAdapter.INPUT_TYPES()["required"]["ipadapter_name"][0]
    return LoadIPAdapter().load(name)[0]


@pytest.fixture(scope="module")
def faceid(tiny_model):
    return _write_adapter(tiny_model[0], "faceid", D, "ipa_nodes_test_faceid.safetensors")


@pytest.fixture(scope="module")
def conds(tiny_model):
    clip = tiny_model[1]
    with torch.inference_mode():
        return (nodes.CLIPTextEncode().encode(clip, "a photo of a person")[0],
                nodes.CLIPTextEncode().encode(clip, "")[0])


def _face_embeds(n, seed=0, src=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, D, generator=g), dim=-1)
    return FaceEmbeds(x, "test/embedder", True, tuple(src or range(n)))


def _sample(model, conds, seed=3):
    with torch.inference_mode():
        latent = nodes.EmptyLatentImage().generate(64, 64, 1)[0]
        return nodes.KSampler().sample(model, seed, STEPS, 5.0, "euler", "normal", conds[0], conds[1], latent)[0][
            "samples"]


@pytest.fixture(scope="module")
def reference(tiny_model, conds):
    return _sample(tiny_model[0], conds)


@pytest.fixture(scope="module")
def embeds(faceid):
    return IPAdapterEncode().encode(faceid, "center", face_embeds=_face_embeds(4))[0]


def test_load_detects_variant_and_encode_checks_inputs(faceid, embeds):
    assert faceid.variant.name == "faceid" and faceid.variant.input_dim == D and len(faceid.kv) == 3
    assert embeds.embeds.shape == (4, D) and embeds.kind == "face"
    with pytest.raises(ValueError, match=r"IPAdapterEncode: .*FaceID IP-Adapter: connect face_embeds"):
        IPAdapterEncode().encode(faceid, "center")
    wrong = FaceEmbeds(torch.ones(2, 64), "other", False, (0, 1))
    with pytest.raises(ValueError, match=r"IPAdapterEncode: input 'face_embeds' holds 64-d .* takes 128-d embeddings"):
        IPAdapterEncode().encode(faceid, "center", face_embeds=wrong)


def test_weight_zero_is_bit_exact_and_weight_changes_output(tiny_model, faceid, embeds, conds, reference):
    model = tiny_model[0]
    before = copy.deepcopy(model.model_options)
    zero = ApplyIPAdapter().apply(model, faceid, embeds, 0.0, 0.0, 1.0)[0]
    assert zero is not model and len(zero.model_options["transformer_options"]["patches_replace"]["attn2"]) == 3
    assert torch.equal(_sample(zero, conds), reference)
    one = ApplyIPAdapter().apply(model, faceid, embeds, 1.0, 0.0, 1.0)[0]
    out = _sample(one, conds)
    assert torch.isfinite(out).all() and (out - reference).abs().max() > 1e-3
    assert model.model_options == before  # the input model is not mutated
    assert "patches_replace" not in model.model_options.get("transformer_options", {})


def test_outside_the_window_output_is_unchanged(tiny_model, faceid, embeds, conds, reference):
    late = ApplyIPAdapter().apply(tiny_model[0], faceid, embeds, 1.0, 1.0, 1.0)[0]  # window: sigma = 0 only
    assert torch.equal(_sample(late, conds), reference)
    ms = tiny_model[0].get_model_object("model_sampling")
    part = ApplyIPAdapter().apply(tiny_model[0], faceid, embeds, 1.0, 0.5, 1.0)[0]
    term = part.model_options["transformer_options"]["patches_replace"]["attn2"][("input", 1, 0)].terms[0]
    assert term.sigma_start == pytest.approx(ms.percent_to_sigma(0.5)) and term.sigma_end == 0.0


def test_two_regions_stack_without_touching_the_first_patch(tiny_model, faceid, conds, reference):
    left = torch.zeros(1, 64, 64)
    left[..., :32] = 1
    a = IPAdapterEncode().encode(faceid, "center", face_embeds=_face_embeds(1, seed=1))[0]
    b = IPAdapterEncode().encode(faceid, "center", face_embeds=_face_embeds(1, seed=2))[0]
    one = ApplyIPAdapter().apply(tiny_model[0], faceid, a, 1.0, 0.0, 1.0, attn_mask=left)[0]
    two = ApplyIPAdapter().apply(one, faceid, b, 1.0, 0.0, 1.0, attn_mask=1 - left)[0]
    key = ("output", 1, 0)
    p1 = one.model_options["transformer_options"]["patches_replace"]["attn2"][key]
    p2 = two.model_options["transformer_options"]["patches_replace"]["attn2"][key]
    assert len(p1.terms) == 1 and len(p2.terms) == 2 and p2.terms[0] is p1.terms[0]
    out1, out2 = _sample(one, conds), _sample(two, conds)
    assert not torch.equal(out1, out2) and not torch.equal(out1, reference)
    # a mask of zeros means no image term anywhere: bit-exact
    none = ApplyIPAdapter().apply(tiny_model[0], faceid, a, 1.0, 0.0, 1.0, attn_mask=torch.zeros(64, 64))[0]
    assert torch.allclose(_sample(none, conds), reference, atol=1e-5)


def test_aggregate_node_mean_skip_report_and_self_attention(faceid, embeds, tmp_path):
    bad = agg.RefEmbeds(torch.cat([embeds.embeds, torch.zeros(1, D)]), "face", "m", (0, 2, 3, 5, 6),
                        ("images [1, 4] had no usable face (skipped by FaceDetectCrop)",))
    out, report = AggregateEmbeds().aggregate(bad, "mean", "none", 0)
    assert torch.equal(out.embeds, embeds.embeds.mean(0, keepdim=True))
    assert "[6] skipped" in report and "images [1, 4]" in report and "mean of 4" in report
    empty, report = AggregateEmbeds().aggregate(bad.select([4]), "mean", "none", 0)
    assert len(empty) == 0 and "no usable reference" in report
    with pytest.raises(ValueError, match="self-attention needs aggregator_name"):
        AggregateEmbeds().aggregate(embeds, "self-attention", "none", 0)
    folder = folder_paths.get_folder_paths("facecond_aggregators")[0]
    os.makedirs(folder, exist_ok=True)
    agg.save_aggregator(agg.SelfAttentionAggregator(D, 6), os.path.join(folder, "agg_nodes_test.safetensors"))
    out, report = AggregateEmbeds().aggregate(embeds, "self-attention", "agg_nodes_test.safetensors", 3)
    assert out.embeds.shape == (1, D) and "bootstrapped to 6" in report


def test_empty_references_leave_the_model_unpatched(tiny_model, faceid, embeds):
    empty = embeds.select([])
    m = ApplyIPAdapter().apply(tiny_model[0], faceid, empty, 1.0, 0.0, 1.0)[0]
    assert "patches_replace" not in m.model_options.get("transformer_options", {})


def test_plain_and_plus_through_a_tiny_clip_vision(tiny_model, conds, reference, tmp_path):
    """ComfyUI's own ClipVisionModel with a tiny config (the loader's detection only knows full-size encoders)."""
    cfg = {"hidden_act": "quick_gelu", "hidden_size": 32, "image_size": 28, "intermediate_size": 64,
           "layer_norm_eps": 1e-5, "model_type": "clip_vision_model", "num_attention_heads": 2, "num_channels": 3,
           "num_hidden_layers": 3, "patch_size": 14, "projection_dim": 24}
    (tmp_path / "cv.json").write_text(json.dumps(cfg))
    cv = comfy.clip_vision.ClipVisionModel(str(tmp_path / "cv.json"))
    g = torch.Generator().manual_seed(0)
    cv.load_sd({k: torch.randn(v.shape, generator=g) * 0.1 for k, v in cv.get_sd().items()})
    image = torch.rand(3, 40, 48, 3, generator=g)
    for kind, width, shape in (("plain", 24, (3, 24)), ("plus", 32, (3, 5, 32))):
        adapter = _write_adapter(tiny_model[0], kind, width, f"ipa_nodes_test_{kind}.safetensors")
        emb, report = IPAdapterEncode().encode(adapter, "center", image=image, clip_vision=cv)
        assert emb.embeds.shape == shape and "3 references" in report
        one = AggregateEmbeds().aggregate(emb, "max", "none", 0)[0]
        out = _sample(ApplyIPAdapter().apply(tiny_model[0], adapter, one, 1.0, 0.0, 1.0)[0], conds)
        assert torch.isfinite(out).all() and not torch.equal(out, reference)
    with pytest.raises(ValueError, match=r"embeds are face \(128-d\) but .* takes clip_hidden"):
        ApplyIPAdapter().apply(tiny_model[0], adapter, _face_embeds_as_ref(), 1.0, 0.0, 1.0)


def _face_embeds_as_ref():
    return agg.RefEmbeds(torch.ones(1, D), "face", "m", (0,))


def test_aggregator_trainer_leave_one_out_resume_and_held_out_loss(tiny_model, faceid, comfy_base, shared_data,
                                                                  tmp_path):
    """scripts/train_aggregator.py on the real johns/ photos (3 people -> 2 train, 1 test), a few steps."""
    import train_aggregator as ta

    from facecond_dev import host

    host.install_stand_in_models(comfy_base)
    model, clip, vae = tiny_model
    data = shared_data / "faces" / "johns"
    train_names, test_names = ta.split_people([p.name for p in data.iterdir() if p.is_dir()], seed=0)
    assert len(train_names) == 2 and len(test_names) == 1 and not set(train_names) & set(test_names)
    kw = dict(size=64, caption="a photo of a man", recogniser=host.STAND_IN_RECOGNISER, clip_vision=None,
              max_images=3)
    train_p = ta.build_people(data, train_names, model, clip, vae, faceid, **kw)
    test_p = ta.build_people(data, test_names, model, clip, vae, faceid, **kw)
    assert [p.embeds.shape[1] for p in train_p + test_p] == [D, D, D]
    assert all(p.latents.shape[0] == p.contexts.shape[0] == p.embeds.shape[0] >= 2 for p in train_p)
    state = tmp_path / "agg.state.safetensors"
    common = dict(n_refs=3, heads=1, lr=1e-2, seed=0)
    g, _, losses, test = ta.train(train_p, test_p, model, faceid, steps=2, state_path=state, eval_rounds=1, **common)
    assert len(losses) == 2 and all(np.isfinite(losses)) and set(test) == {"self-attention", "mean"}
    assert all(np.isfinite(list(test.values())))
    assert g.out.weight.abs().sum() > 0  # W_out moved away from mean pooling
    _, _, resumed, _ = ta.train(train_p, test_p, model, faceid, steps=3, state_path=state, resume=True, eval_rounds=0,
                             **common)
    _, _, fresh, _ = ta.train(train_p, test_p, model, faceid, steps=3, eval_rounds=0, **common)
    assert len(resumed) == 1 and resumed[0] == pytest.approx(fresh[2], rel=1e-5)
    agg.save_aggregator(g, tmp_path / "g.safetensors")
    assert int(agg.load_aggregator(tmp_path / "g.safetensors").n_refs) == 3
