"""The FaceID LoRA of an IP-Adapter file on the tiny SD1.5 checkpoint, applied by ApplyIPAdapter.

The tiny U-Net differs from SD1.5: one level, so 3 transformer blocks (input 1, output 0, output 1; no middle
block), all 320 wide (8 heads of 40) with 768-wide text context, where SD1.5 has 16 blocks of 320/640/1280. The
test files are FaceID layout sized for it: 6 attention processors (0..5), self-attention LoRA 320 -> 320, the
cross-attention k/v LoRA 768 -> 320, rank 8, random, written at test time with and without the LoRA keys (the same
seed, so the rest of the adapter is identical).
"""

from __future__ import annotations

import copy
import os

import comfy.lora
import comfy.ops
import comfy.utils
import folder_paths
import pytest
import torch
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
from safetensors.torch import save_file

import nodes
from facecond.nodes.ipadapter.adapter import ApplyIPAdapter, IPAdapterEncode, LoadIPAdapter, cross_attention_layers
from facecond.nodes.ipadapter.lora import transformer_blocks
from facecond.py.faces.types import FaceEmbeds
from facecond.py.ipadapter import lora as ipa_lora
from facecond_dev.random_weights import random_state_dict

D, RANK = 128, 8


def _write(model, name, lora_rank, extra=None):
    layers = cross_attention_layers(model)
    sd = random_state_dict("faceid", D, [inner for _, inner, _ in layers], cross_dim=layers[0][2], seed=5,
                           scale=0.5, lora_rank=lora_rank) | (extra or {})
    folder = folder_paths.get_folder_paths("ipadapter")[0]
    os.makedirs(folder, exist_ok=True)
    save_file(sd, os.path.join(folder, name))
    return LoadIPAdapter().load(name)


@pytest.fixture(scope="module")
def adapters(tiny_model):
    with_lora, info = _write(tiny_model[0], "ipa_lora_test.safetensors", RANK)
    plain, plain_info = _write(tiny_model[0], "ipa_lora_test_plain.safetensors", 0)
    assert "LoRA on 6 attention layers (rank 8" in info and "LoRA" not in plain_info
    return with_lora, plain


@pytest.fixture(scope="module")
def embeds(adapters):
    x = torch.nn.functional.normalize(torch.randn(2, D, generator=torch.Generator().manual_seed(0)), dim=-1)
    return IPAdapterEncode().encode(adapters[0], "center", face_embeds=FaceEmbeds(x, "test", True, (0, 1)))[0]


@pytest.fixture(scope="module")
def conds(tiny_model):
    with torch.inference_mode():
        return tuple(nodes.CLIPTextEncode().encode(tiny_model[1], t)[0] for t in ("a photo of a person", ""))


def _sample(model, conds):
    with torch.inference_mode():
        latent = nodes.EmptyLatentImage().generate(64, 64, 1)[0]
        return nodes.KSampler().sample(model, 3, 3, 5.0, "euler", "normal", conds[0], conds[1], latent)[0]["samples"]


def test_mapping_on_a_real_sd15_unet_matches_comfyuis_diffusers_names():
    """transformer_blocks on an SD1.5-config U-Net (meta tensors) gives SD15_BLOCKS, and every LoRA target is the
    weight ComfyUI's own diffusers map names for the processor in diffusers order (down, up, mid; attn1, attn2)."""
    cfg = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
               channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
               transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], context_dim=768,
               use_spatial_transformer=True, use_linear_in_transformer=False, num_heads=8, legacy=False)
    with torch.device("meta"):
        unet = UNetModel(**cfg, device="meta", operations=comfy.ops.disable_weight_init)
    blocks = transformer_blocks(unet)
    assert tuple(blocks) == ipa_lora.SD15_BLOCKS
    diffusers = [f"down_blocks.{b}.attentions.{a}" for b in range(3) for a in range(2)] + \
                [f"up_blocks.{b}.attentions.{a}" for b in (1, 2, 3) for a in range(3)] + ["mid_block.attentions.0"]
    to_comfy = comfy.utils.unet_to_diffusers(cfg)
    lora = {f"{p}.{proj}_lora.{s}.weight": torch.zeros(1) for p in range(32)
            for proj in ("to_q", "to_k", "to_v", "to_out") for s in ("down", "up")}
    keys = ipa_lora.key_map(lora, blocks)
    for p in range(32):
        for proj, mod in (("to_q", "to_q"), ("to_k", "to_k"), ("to_v", "to_v"), ("to_out", "to_out.0")):
            name = f"{diffusers[p // 2]}.transformer_blocks.0.attn{1 + p % 2}.{mod}.weight"
            assert keys[f"{p}.{proj}"] == "diffusion_model." + to_comfy[name], (p, proj)
    shapes = {k: tuple(unet.get_parameter(k[len("diffusion_model."):]).shape) for k in keys.values()}
    assert shapes[keys["13.to_k"]] == (1280, 768) and shapes[keys["19.to_k"]] == (640, 768)
    assert shapes[keys["24.to_q"]] == (320, 320) and shapes[keys["30.to_out"]] == (1280, 1280)


def test_lora_changes_the_unet_and_strength_zero_is_bit_identical(tiny_model, adapters, embeds, conds):
    model = tiny_model[0]
    with_lora, plain = adapters
    before_options, before_patches = copy.deepcopy(model.model_options), dict(model.patches)
    reference = _sample(model, conds)
    no_lora = _sample(ApplyIPAdapter().apply(model, plain, embeds, 1.0, 0.0, 1.0)[0], conds)

    zero = ApplyIPAdapter().apply(model, with_lora, embeds, 1.0, 0.0, 1.0, lora_strength=0.0)[0]
    assert zero.patches == {} and torch.equal(_sample(zero, conds), no_lora)

    one = ApplyIPAdapter().apply(model, with_lora, embeds, 1.0, 0.0, 1.0, lora_strength=1.0)[0]
    assert len(one.patches) == 6 * 4 and all(len(v) == 1 for v in one.patches.values())
    out = _sample(one, conds)
    assert torch.isfinite(out).all() and (out - no_lora).abs().max() > 1e-2
    assert not torch.equal(_sample(ApplyIPAdapter().apply(model, with_lora, embeds, 1.0, 0.0, 1.0,
                                                          lora_strength=0.5)[0], conds), out)

    # the input model: no patches, same options, and its weights are restored after the patched clone ran
    assert model.patches == before_patches == {} and model.model_options == before_options
    assert torch.equal(_sample(model, conds), reference)


def test_patched_weight_is_w_plus_strength_up_down(tiny_model, adapters, embeds):
    """Processor 3 = cross-attention of transformer block 1 = output_blocks.0 in the tiny U-Net: ComfyUI's patch
    maths on that weight gives W + s·up@down."""
    model, (with_lora, _) = tiny_model[0], adapters
    key = "diffusion_model.output_blocks.0.1.transformer_blocks.0.attn2.to_k.weight"
    m = ApplyIPAdapter().apply(model, with_lora, embeds, 1.0, 0.0, 1.0, lora_strength=0.5)[0]
    w = model.get_model_object(key).detach().float()
    up, down = with_lora.lora["3.to_k_lora.up.weight"].float(), with_lora.lora["3.to_k_lora.down.weight"].float()
    assert up.shape == (320, RANK) and down.shape == (RANK, 768) and w.shape == (320, 768)
    got = comfy.lora.calculate_weight(m.patches[key], w.clone(), key)
    torch.testing.assert_close(got, w + 0.5 * up @ down, rtol=1e-5, atol=1e-5)
    assert (got - w).abs().max() > 1e-2


def test_second_apply_puts_the_lora_on_once(tiny_model, adapters, embeds):
    with_lora = adapters[0]
    left = torch.zeros(1, 64, 64)
    left[..., :32] = 1
    one = ApplyIPAdapter().apply(tiny_model[0], with_lora, embeds, 1.0, 0.0, 1.0, attn_mask=left)[0]
    two = ApplyIPAdapter().apply(one, with_lora, embeds, 1.0, 0.0, 1.0, attn_mask=1 - left)[0]
    assert len(two.patches) == 24 and all(len(v) == 1 for v in two.patches.values())
    attn2 = two.model_options["transformer_options"]["patches_replace"]["attn2"]
    assert all(len(p.terms) == 2 for p in attn2.values())  # the image terms still stack


def test_file_without_lora_still_works_and_a_foreign_lora_is_refused(tiny_model, adapters, embeds, conds):
    m = ApplyIPAdapter().apply(tiny_model[0], adapters[1], embeds, 1.0, 0.0, 1.0, lora_strength=1.0)[0]
    assert m.patches == {} and torch.isfinite(_sample(m, conds)).all()
    extra = {f"ip_adapter.6.to_q_lora.{s}.weight": torch.zeros(shape) for s, shape in (("down", (4, 320)),
                                                                                     ("up", (320, 4)))}
    bad, _ = _write(tiny_model[0], "ipa_lora_test_bad.safetensors", RANK, extra)
    with pytest.raises(ValueError, match=r"ApplyIPAdapter: ipa_lora_test_bad\.safetensors: .*processors up to 6 but "
                                         r"the model has 3 transformer blocks"):
        ApplyIPAdapter().apply(tiny_model[0], bad, embeds, 1.0, 0.0, 1.0)


def test_validate_inputs_checks_lora_strength():
    assert ApplyIPAdapter.VALIDATE_INPUTS(1.0, 0.0, 1.0, 1.0) is True
    assert "lora_strength is NaN" in ApplyIPAdapter.VALIDATE_INPUTS(1.0, 0.0, 1.0, float("nan"))
    assert "lora_strength = 3.0 is above its maximum 2.0" in ApplyIPAdapter.VALIDATE_INPUTS(lora_strength=3.0)
