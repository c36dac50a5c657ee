"""ApplyIPAdapter inside regional graphs, in-process with real core nodes (ConditioningSetArea, ConditioningCombine,
KSampler) on the tiny SD1.5 checkpoint: the attn_mask cut to each area, the mask batch and aspect checks, and the
warning when another attn2 patch replaces the pack's.

The first cross-attention of each model call is observed by a recorder set *after* the pack's patch that calls it
(a chaining foreign patch): it keeps q, k, v, the chunk layout and the pack's output, which are then checked against
softmax attention written out by hand with masks cut by hand.
"""

from __future__ import annotations

import logging
import os

import comfy.ldm.modules.attention as comfy_attention
import folder_paths
import pytest
import torch
from safetensors.torch import save_file

import nodes
from facecond.nodes.ipadapter.adapter import ApplyIPAdapter, IPAdapterEncode, LoadIPAdapter, cross_attention_layers
from facecond.py.faces.types import FaceEmbeds
from facecond_dev.random_weights import random_state_dict
from facecond_dev.reference import hand_attention

D = 128
KEY = ("input", 1, 0)  # the first cross-attention: its queries come straight from the latent window


@pytest.fixture(scope="module")
def faceid(tiny_model):
    model = tiny_model[0]
    layers = cross_attention_layers(model)
    sd = random_state_dict("faceid", D, [inner for _, inner, _ in layers], cross_dim=layers[0][2], seed=5, scale=0.5)
    sd = {k: v for k, v in sd.items() if "lora" not in k}  # no LoRA: only the image term differs
    folder = folder_paths.get_folder_paths("ipadapter")[0]
    os.makedirs(folder, exist_ok=True)
    save_file(sd, os.path.join(folder, "ipa_regions_test.safetensors"))
    return LoadIPAdapter().load("ipa_regions_test.safetensors")[0]


@pytest.fixture(scope="module")
def embeds(faceid):
    x = torch.nn.functional.normalize(torch.randn(1, D, generator=torch.Generator().manual_seed(0)), dim=-1)
    return IPAdapterEncode().encode(faceid, "center", face_embeds=FaceEmbeds(x, "test/embedder", True, (0,)))[0]


@pytest.fixture(scope="module")
def texts(tiny_model):
    clip = tiny_model[1]
    with torch.inference_mode():
        return {t: nodes.CLIPTextEncode().encode(clip, t)[0] for t in ("a man", "a woman", "a room", "")}



class Recorder:
    """A foreign attn2 replace set after the pack's; it calls the pack's patch (kept as an attribute: chaining)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __deepcopy__(self, memo):
        return self

    def __call__(self, q, k, v, extra):
        out = self.inner(q, k, v, extra)
        self.calls.append(dict(q=q.clone(), k=k.clone(), v=v.clone(), out=out.clone(), heads=extra["n_heads"],
                               cond_or_uncond=list(extra["cond_or_uncond"]), shape=list(extra["original_shape"])))
        return out


def _sample(model, positive, negative, width=64, height=64, batch=1, steps=2):
    with torch.inference_mode():
        latent = nodes.EmptyLatentImage().generate(width, height, batch)[0]
        return nodes.KSampler().sample(model, 7, steps, 5.0, "euler", "normal", positive, negative, latent)[0][
            "samples"]


def test_mask_is_cut_to_each_area_conditioning(tiny_model, faceid, embeds, texts):
    """64 x 64 px (8 x 8 latent). Positive: 'a man' on the left 24 px (3 cells) + 'a woman' on the right 40 px
    (5 cells) + 'a room' everywhere (ConditioningCombine). attn_mask: 1 on px rows 0-31, columns 16-47 (latent
    rows 0-3, columns 2-5), across both areas. KSampler also runs the negative on each area (comfy/samplers.py
    ``create_cond_with_same_area_if_none``). Each chunk's shape tells its area: 8x8 whole, 8x3 left, 8x5 right."""
    mask = torch.zeros(1, 64, 64)
    mask[:, 0:32, 16:48] = 1
    cells = torch.zeros(8, 8)
    cells[0:4, 2:6] = 1  # the same mask in latent cells, by hand
    expected_gate = {(8, 8): cells, (8, 3): cells[:, 0:3], (8, 5): cells[:, 3:8]}
    area = nodes.ConditioningSetArea()
    left = area.append(texts["a man"], 24, 64, 0, 0, 1.0)[0]
    right = area.append(texts["a woman"], 40, 64, 24, 0, 1.0)[0]
    positive = nodes.ConditioningCombine().combine(nodes.ConditioningCombine().combine(left, right)[0],
                                                   texts["a room"])[0]
    weight = 0.8
    m = ApplyIPAdapter().apply(tiny_model[0], faceid, embeds, weight, 0.0, 1.0, attn_mask=mask)[0]
    ours = m.model_options["transformer_options"]["patches_replace"]["attn2"][KEY]
    rec = Recorder(ours)
    m.set_model_attn2_replace(rec, *KEY)
    out = _sample(m, positive, texts[""])
    assert torch.isfinite(out).all()
    term = ours.terms[0]
    seen = set()
    for call in rec.calls:
        q, k, v, heads = call["q"], call["k"], call["v"], call["heads"]
        hw = tuple(call["shape"][-2:])
        gate = expected_gate[hw].flatten()[None, :, None].double()
        chunks = call["cond_or_uncond"]
        rows = q.shape[0] // len(chunks)
        expect = hand_attention(q, k, v, heads)
        for i, c in enumerate(chunks):
            sl = slice(i * rows, (i + 1) * rows)
            k_ip, v_ip = (term.k_neg, term.v_neg) if c == 1 else (term.k, term.v)
            expect[sl] += weight * hand_attention(q[sl], k_ip.expand(rows, -1, -1), v_ip.expand(rows, -1, -1),
                                                  heads) * gate
            seen.add((hw, c))
        torch.testing.assert_close(call["out"].double(), expect, atol=2e-5, rtol=1e-4)
        # exactly the base attention where the cut mask is 0
        base = comfy_attention.optimized_attention(q, k, v, heads)
        off = gate[0, :, 0] == 0
        assert torch.equal(call["out"][:, off], base[:, off])
        assert not torch.equal(call["out"][:, ~off], base[:, ~off])
    assert seen == {((8, 8), 0), ((8, 8), 1), ((8, 3), 0), ((8, 3), 1), ((8, 5), 0), ((8, 5), 1)}


def test_mask_batch_must_be_one_or_the_latent_batch(tiny_model, faceid, embeds, texts):
    three = torch.ones(3, 64, 64)
    m = ApplyIPAdapter().apply(tiny_model[0], faceid, embeds, 1.0, 0.0, 1.0, attn_mask=three)[0]
    with pytest.raises(ValueError, match=r"ApplyIPAdapter: attn_mask holds 3 masks but the latent batch is 2: give one "
                                         r"mask \(used for every image\) or 2 \(one per image\)"):
        _sample(m, texts["a man"], texts[""], batch=2, steps=1)
    two = torch.zeros(2, 64, 64)
    two[1] = 1  # image 0: no image term; image 1: everywhere
    m = ApplyIPAdapter().apply(tiny_model[0], faceid, embeds, 1.0, 0.0, 1.0, attn_mask=two)[0]
    plain = _sample(tiny_model[0], texts["a man"], texts[""], batch=2, steps=1)
    full = _sample(ApplyIPAdapter().apply(tiny_model[0], faceid, embeds, 1.0, 0.0, 1.0)[0], texts["a man"], texts[""],
                   batch=2, steps=1)
    out = _sample(m, texts["a man"], texts[""], batch=2, steps=1)
    torch.testing.assert_close(out[0], plain[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], full[1], atol=1e-5, rtol=0)
    assert (out[1] - plain[1]).abs().max() > 1e-3


def test_mask_of_another_aspect_is_stretched_with_a_warning(tiny_model, faceid, embeds, texts, caplog):
    """Decision (docs/IPADAPTER.md): stretched (a left-half mask stays the left half), warned once with the sizes;
    never refused, since fractional masks (SolidMask, drawn on a square canvas) are a normal way to split an image."""
    square = torch.zeros(1, 64, 64)
    square[..., :32] = 1
    wide = torch.zeros(1, 64, 96)
    wide[..., :48] = 1
    a = ApplyIPAdapter().apply(tiny_model[0], faceid, embeds, 1.0, 0.0, 1.0, attn_mask=square)[0]
    b = ApplyIPAdapter().apply(tiny_model[0], faceid, embeds, 1.0, 0.0, 1.0, attn_mask=wide)[0]
    with caplog.at_level(logging.WARNING, logger="facecond"):
        out_b = _sample(b, texts["a man"], texts[""], width=96, steps=1)
        assert not [r for r in caplog.records if "aspect differs" in r.getMessage()]
        out_a = _sample(a, texts["a man"], texts[""], width=96, steps=1)
    warned = [r.getMessage() for r in caplog.records if "aspect differs" in r.getMessage()]
    assert len(warned) == 1 and "attn_mask is 64x64 (w x h) but the latent is 12x8 (96x64 px)" in warned[0]
    torch.testing.assert_close(out_a, out_b, atol=1e-5, rtol=0)  # stretched = the image-sized left half


def test_a_patch_set_after_ours_is_reported(tiny_model, faceid, embeds, texts, caplog):
    """ComfyUI keeps one attn2 replace per key (the last set wins). Set before ours: kept as our base, no warning.
    Set after ours: ours is gone, a warning at sampling names how many layers and the patch that replaced it."""

    def foreign(q, k, v, extra):
        return comfy_attention.optimized_attention(q, k, v, extra["n_heads"])

    keys = [key for key, _, _ in cross_attention_layers(tiny_model[0])]
    before = tiny_model[0].clone()
    for key in keys:
        before.set_model_attn2_replace(foreign, *key)
    ours_on_top = ApplyIPAdapter().apply(before, faceid, embeds, 1.0, 0.0, 1.0)[0]
    after = ApplyIPAdapter().apply(tiny_model[0], faceid, embeds, 1.0, 0.0, 1.0)[0].clone()
    for key in keys:
        after.set_model_attn2_replace(foreign, *key)
    with caplog.at_level(logging.WARNING, logger="facecond"):
        _sample(ours_on_top, texts["a man"], texts[""], steps=1)
        assert not [r for r in caplog.records if "attn2 patch is gone" in r.getMessage()]
        replaced = _sample(after, texts["a man"], texts[""], steps=1)
    warned = [r.getMessage() for r in caplog.records if "attn2 patch is gone" in r.getMessage()]
    assert len(warned) == 1 and f"from {len(keys)} of {len(keys)} cross-attentions" in warned[0]
    assert "test_a_patch_set_after_ours_is_reported.<locals>.foreign" in warned[0]
    plain = _sample(tiny_model[0], texts["a man"], texts[""], steps=1)
    torch.testing.assert_close(replaced, plain, atol=1e-5, rtol=0)  # the image term is indeed off
