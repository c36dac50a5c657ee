"""FaceID LoRA mapping: which U-Net weight each ``<n>.to_x_lora`` pair patches, checked by hand against the SD1.5
layout (processors 2n / 2n+1 = attn1 / attn2 of transformer block n: input 1, 2, 4, 5, 7, 8, output 3..11, middle)."""

from __future__ import annotations

import pytest
import torch

from facecond.py.ipadapter import adapter as ipa
from facecond.py.ipadapter import lora
from facecond_dev.random_weights import random_state_dict

SD15_INNER = [320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320, 1280]


def _sd15_lora(rank=2, procs=range(32)):
    """A LoRA in the FaceID layout for SD1.5 widths (context 768 for the cross-attention k and v)."""
    sd = {}
    for p in procs:
        inner = SD15_INNER[p // 2]
        for proj in ("to_q", "to_k", "to_v", "to_out"):
            d_in = 768 if p % 2 and proj in ("to_k", "to_v") else inner
            sd[f"ip_adapter.{p}.{proj}_lora.down.weight"] = torch.zeros(rank, d_in)
            sd[f"ip_adapter.{p}.{proj}_lora.up.weight"] = torch.zeros(inner, rank)
    return sd


def _sd15_shapes():
    shapes = {}
    for n, prefix in enumerate(lora.SD15_BLOCKS):
        inner = SD15_INNER[n]
        for a in (1, 2):
            for proj in ("to_q", "to_k", "to_v", "to_out.0"):
                d_in = 768 if a == 2 and proj in ("to_k", "to_v") else inner
                shapes[f"{prefix}.attn{a}.{proj}.weight"] = (inner, d_in)
    return shapes


def test_sd15_blocks_are_the_16_transformers_in_processor_order():
    assert len(lora.SD15_BLOCKS) == 16
    assert lora.SD15_BLOCKS[0] == "diffusion_model.input_blocks.1.1.transformer_blocks.0"
    assert lora.SD15_BLOCKS[5] == "diffusion_model.input_blocks.8.1.transformer_blocks.0"
    assert lora.SD15_BLOCKS[6] == "diffusion_model.output_blocks.3.1.transformer_blocks.0"
    assert lora.SD15_BLOCKS[14] == "diffusion_model.output_blocks.11.1.transformer_blocks.0"
    assert lora.SD15_BLOCKS[15] == "diffusion_model.middle_block.1.transformer_blocks.0"


def test_key_map_by_hand():
    w = lora.lora_weights(_sd15_lora())
    assert len(w) == 32 * 4 * 2 and "0.to_q_lora.down.weight" in w and lora.processors(w) == list(range(32))
    keys = lora.key_map(w, lora.SD15_BLOCKS)
    assert len(keys) == 128
    b = "diffusion_model.{}.1.transformer_blocks.0.{}"
    assert keys["0.to_q"] == b.format("input_blocks.1", "attn1.to_q.weight")
    assert keys["1.to_k"] == b.format("input_blocks.1", "attn2.to_k.weight")
    assert keys["2.to_v"] == b.format("input_blocks.2", "attn1.to_v.weight")
    assert keys["11.to_out"] == b.format("input_blocks.8", "attn2.to_out.0.weight")
    assert keys["12.to_q"] == b.format("output_blocks.3", "attn1.to_q.weight")
    assert keys["13.to_out"] == b.format("output_blocks.3", "attn2.to_out.0.weight")
    assert keys["29.to_v"] == b.format("output_blocks.11", "attn2.to_v.weight")
    assert keys["30.to_k"] == b.format("middle_block", "attn1.to_k.weight")
    assert keys["31.to_v"] == b.format("middle_block", "attn2.to_v.weight")
    assert len(set(keys.values())) == 128  # every weight patched once
    lora.check_shapes(w, keys, _sd15_shapes())  # real SD1.5 widths fit


def test_odd_processors_are_the_cross_attentions_of_the_ip_layers():
    """ip_adapter.{2n+1}.to_k_ip is the n-th cross-attention (adapter.py): the LoRA of processor 2n+1 lands there."""
    keys = lora.key_map(lora.lora_weights(_sd15_lora()), lora.SD15_BLOCKS)
    for n in range(16):
        assert keys[f"{2 * n + 1}.to_k"] == f"{lora.SD15_BLOCKS[n]}.attn2.to_k.weight"
        assert keys[f"{2 * n}.to_k"] == f"{lora.SD15_BLOCKS[n]}.attn1.to_k.weight"


def test_errors_name_what_is_wrong():
    sd = _sd15_lora(procs=[0, 1])
    del sd["ip_adapter.1.to_v_lora.up.weight"]
    with pytest.raises(ValueError, match=r"1\.to_v_lora\.down\.weight has no up weight"):
        lora.lora_weights(sd)
    with pytest.raises(ValueError, match="processors up to 31 but the model has 3 transformer blocks"):
        lora.key_map(lora.lora_weights(_sd15_lora()), lora.SD15_BLOCKS[:3])
    w = lora.lora_weights(_sd15_lora(procs=[0, 1]))
    shapes = _sd15_shapes() | {lora.SD15_BLOCKS[0] + ".attn2.to_k.weight": (320, 1024)}  # SD2 context width
    with pytest.raises(ValueError, match=r"1\.to_k_lora \(up \(320, 2\), down \(2, 768\)\) does not fit .*attn2"):
        lora.check_shapes(w, lora.key_map(w, lora.SD15_BLOCKS), shapes)
    w["0.to_q_lora.up.weight"] = torch.zeros(320, 3)  # rank 3 against down's 2
    with pytest.raises(ValueError, match=r"0\.to_q_lora"):
        lora.check_shapes(w, lora.key_map(w, lora.SD15_BLOCKS), _sd15_shapes())


def test_adapter_keeps_the_lora_and_plain_files_have_none():
    with_lora = random_state_dict("faceid", 16, [32, 32, 64], cross_dim=48, lora_rank=4)
    a = ipa.from_state_dict(with_lora, "f")
    assert len(a.lora) == 6 * 4 * 2 and lora.rank(a.lora) == 4 and lora.processors(a.lora) == list(range(6))
    assert a.lora["5.to_k_lora.down.weight"].shape == (4, 48) and a.lora["5.to_k_lora.up.weight"].shape == (64, 4)
    assert a.lora["4.to_k_lora.down.weight"].shape == (4, 64)  # self-attention: k takes the block's own width
    assert all(not k.startswith("ip_adapter.") for k in a.lora)
    plain = ipa.from_state_dict(random_state_dict("faceid", 16, [32, 32, 64], cross_dim=48), "p")
    assert plain.lora == {} and lora.rank(plain.lora) == 0
    assert torch.equal(plain.kv[2][0], a.kv[2][0])  # the LoRA keys come after, same seed: same adapter otherwise
