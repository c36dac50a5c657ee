"""IP-Adapter maths (py/ipadapter/adapter.py): the attn2 patch (decoupled attention) against a hand-computed attention
(λ, window, cond/uncond, mask, stacking), variant detection and file loading in the real key layouts."""


import pytest
import torch
from safetensors.torch import save_file

from facecond.py.ipadapter import adapter as ipa
from facecond.py.weights.manifest import WeightsError
from facecond_dev import reference
from facecond_dev.random_weights import random_state_dict

HEADS = 2


def hand_attention(q, k, v, heads=HEADS):
    return reference.hand_attention(q, k, v, heads)


def qkv(b=2, t=6, s=5, c=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, c, generator=g) for n in (t, s, s)]


def make_term(c=8, tokens=3, weight=1.0, start=10.0, end=1.0, mask=None, seed=2):
    g = torch.Generator().manual_seed(seed)
    k, v, kn, vn = (torch.randn(1, tokens, c, generator=g) for _ in range(4))
    return ipa.IPTerm(k, v, kn, vn, weight, start, end, mask)


def opts(sigma, cond_or_uncond=(0, 1), shape=(2, 3)):
    return {"n_heads": HEADS, "sigmas": torch.tensor([sigma]), "cond_or_uncond": list(cond_or_uncond),
            "activations_shape": [1, 8, *shape], "original_shape": [1, 4, *shape]}


def test_patch_is_decoupled_attention_base_at_zero_plus_exactly_the_image_term():
    """Z = Attention(Q, K, V) + λ·Attention(Q, K', V') (Ye et al. 2023, eq. 5) for a batch of cond rows."""
    q, k, v = qkv()
    base = ipa.IPAttentionPatch((make_term(weight=0.0),))(q, k, v, opts(5.0, (0,)))
    torch.testing.assert_close(base.double(), hand_attention(q, k, v), atol=1e-6, rtol=1e-6)
    assert torch.equal(base, ipa.sdpa(q, k, v, HEADS))
    for lam in (0.5, 1.0, -0.7):
        term = make_term(weight=lam)
        z = ipa.IPAttentionPatch((term,))(q, k, v, opts(5.0, (0,)))
        expect = hand_attention(q, k, v) + lam * hand_attention(q, term.k.expand(2, -1, -1), term.v.expand(2, -1, -1))
        torch.testing.assert_close(z.double(), expect, atol=1e-6, rtol=1e-6)


def test_patch_uses_cond_and_uncond_image_keys_per_chunk():
    q, k, v = qkv(b=2, t=6)
    term = make_term(weight=0.8)
    out = ipa.IPAttentionPatch((term,))(q, k, v, opts(5.0, (0, 1)))
    expect = hand_attention(q, k, v)
    expect[:1] += 0.8 * hand_attention(q[:1], term.k, term.v)  # chunk 0 is cond
    expect[1:] += 0.8 * hand_attention(q[1:], term.k_neg, term.v_neg)  # chunk 1 is uncond
    torch.testing.assert_close(out.double(), expect, atol=1e-6, rtol=1e-6)


def test_patch_is_bit_exact_base_at_zero_weight_and_outside_window():
    q, k, v = qkv()
    base = ipa.sdpa(q, k, v, HEADS)
    assert torch.equal(ipa.IPAttentionPatch((make_term(weight=0.0),))(q, k, v, opts(5.0)), base)
    patch = ipa.IPAttentionPatch((make_term(start=10.0, end=1.0),))
    assert torch.equal(patch(q, k, v, opts(10.5)), base)  # before start
    assert torch.equal(patch(q, k, v, opts(0.5)), base)  # after end
    assert not torch.equal(patch(q, k, v, opts(1.0)), base)  # window is inclusive


def test_mask_gates_the_image_term_per_region_and_patches_stack():
    q, k, v = qkv(b=2, t=6)
    left = torch.tensor([[[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]])  # (1, H=2, W=3): top row
    a, b = make_term(mask=left, seed=3), make_term(mask=1 - left, seed=4, weight=0.5)
    stacked = ipa.IPAttentionPatch((a,)).with_term(b)
    out = stacked(q, k, v, opts(5.0))
    base = hand_attention(q, k, v)
    tokens_a = left.flatten()[None, :, None].double()  # the grid is the layer's grid: no resize
    ta = torch.cat([hand_attention(q[:1], a.k, a.v), hand_attention(q[1:], a.k_neg, a.v_neg)])
    tb = torch.cat([hand_attention(q[:1], b.k, b.v), hand_attention(q[1:], b.k_neg, b.v_neg)])
    torch.testing.assert_close(out.double(), base + ta * tokens_a + 0.5 * tb * (1 - tokens_a), atol=1e-6, rtol=1e-6)
    # a foreign replace patch that was there before is kept as the base term
    chained = ipa.IPAttentionPatch((a,), previous=lambda q_, k_, v_, o: torch.zeros_like(q_))
    torch.testing.assert_close(chained(q, k, v, opts(5.0)).double(), ta * tokens_a, atol=1e-6, rtol=1e-6)


SD15_LAYERS = [320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320, 1280]


@pytest.mark.parametrize(("kind", "width", "shape"), [("plain", 1024, (2, 1024)), ("plus", 1280, (2, 257, 1280)),
                                                      ("faceid", 512, (2, 512))])
def test_variant_detection_and_projection_shapes(kind, width, shape):
    sd = random_state_dict(kind, width, SD15_LAYERS, tokens=16 if kind == "plus" else 4)
    adapter = ipa.from_state_dict(sd, "t")
    assert adapter.variant == ipa.Variant(kind, width, 16 if kind == "plus" else 4, 768)
    assert len(adapter.kv) == 16 and adapter.kv[4][0].shape == (1280, 768)
    tokens = adapter.image_tokens(torch.randn(shape))
    assert tokens.shape == (2, adapter.variant.tokens, 768) and torch.isfinite(tokens).all()


def test_plain_projection_is_linear_then_layernorm():
    sd = random_state_dict("plain", 16, [8], cross_dim=8, tokens=2)
    x = torch.randn(3, 16)
    y = (x @ sd["image_proj.proj.weight"].T + sd["image_proj.proj.bias"]).reshape(3, 2, 8)
    y = torch.nn.functional.layer_norm(y, (8,), sd["image_proj.norm.weight"], sd["image_proj.norm.bias"])
    torch.testing.assert_close(ipa.from_state_dict(sd).image_tokens(x), y)


def test_unknown_layouts_are_refused():
    sd = random_state_dict("faceid", 16, [8], cross_dim=8)
    sd["image_proj.proj.3.weight"] = torch.ones(8)  # full-face layout
    with pytest.raises(ValueError, match="unsupported IP-Adapter image projection"):
        ipa.from_state_dict(sd)
    with pytest.raises(ValueError, match="not an IP-Adapter file"):
        ipa.from_state_dict({"image_proj.proj.weight": torch.ones(8, 8)})


def test_files_load_from_safetensors_and_nested_bin(tmp_path):
    sd = random_state_dict("plus", 32, [8, 16], cross_dim=16, tokens=4)
    save_file(sd, tmp_path / "a.safetensors")
    nested = {"image_proj": {k[11:]: v for k, v in sd.items() if k.startswith("image_proj.")},
              "ip_adapter": {k[11:]: v for k, v in sd.items() if k.startswith("ip_adapter.")}}
    torch.save(nested, tmp_path / "a.bin")
    x = torch.randn(1, 5, 32)
    a, b = ipa.load(tmp_path / "a.safetensors"), ipa.load(tmp_path / "a.bin")
    assert a.variant == b.variant == ipa.Variant("plus", 32, 4, 16)
    assert torch.equal(a.image_tokens(x), b.image_tokens(x)) and torch.equal(a.kv[1][1], b.kv[1][1])
    torch.save({"image_proj": {"x": object()}}, tmp_path / "bad.bin")
    with pytest.raises(WeightsError, match="refusing to load"):
        ipa.load(tmp_path / "bad.bin")
