"""IP-Adapter FaceID Plus / Plus v2 and FaceID Portrait (py/ipadapter): tokens and attention output against diffusers'
FaceID Plus classes (IPAdapterFaceIDPlusImageProjection, IPAdapterAttnProcessor2_0) on the same random weights and
inputs, in the SD1.5 and SDXL key layouts; variant recognition and refusals; the dtype the weights are kept in."""

import pytest
import torch

from facecond.py.ipadapter import adapter as ipa
from facecond.py.ipadapter import variants
from facecond_dev import reference
from facecond_dev.random_weights import SD15_LAYERS, SDXL_LAYERS, random_state_dict

TOL = 1e-5


def _proj(sd):
    return {k[len("image_proj."):]: v for k, v in sd.items() if k.startswith("image_proj.")}


# SD1.5: the published shapes (cross 768, CLIP-H 1280, 4-layer resampler of 12 heads, 16 layers); SDXL: cross 2048,
# a 1-layer, 2-head resampler (the published 4 x 32-head one is 800 MB in float32) and the first and last of its 70
# cross-attentions (640 and 1280 wide: all 70 are 1.4 GB of W'_k, W'_v in float32)
LAYOUTS = {"sd15": dict(cross_dim=768, layers=SD15_LAYERS, depth=4, inner=None),
           "sdxl": dict(cross_dim=2048, layers=[SDXL_LAYERS[0], SDXL_LAYERS[-1]], depth=1, inner=128)}


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def plusv2(request):
    lay = LAYOUTS[request.param]
    sd = random_state_dict("faceid_plus", 512, lay["layers"], cross_dim=lay["cross_dim"], depth=lay["depth"],
                           inner=lay["inner"], clip_dim=1280, seed=5, scale=0.05)
    name = f"ip-adapter-faceid-plusv2_{request.param}.bin"
    heads = (lay["inner"] or lay["cross_dim"] // 64 * 64) // 64
    ref = reference.diffusers_faceid_plus(_proj(sd), lay["depth"], heads)
    return request.param, ipa.from_state_dict(sd, name), ref, lay, sd


def _inputs(seed=0, n=2):
    g = torch.Generator().manual_seed(seed)
    face = torch.nn.functional.normalize(torch.randn(n, 512, generator=g), dim=-1) * 20  # insightface: norm ~20
    return face, torch.randn(n, 257, 1280, generator=g)


def test_plusv2_tokens_match_diffusers(plusv2):
    layout, adapter, ref, lay, _sd = plusv2
    assert adapter.variant.name == "faceid_plusv2" and adapter.variant.clip_dim == 1280
    assert adapter.variant.cross_dim == lay["cross_dim"] and len(adapter.kv) == len(lay["layers"])
    face, hidden = _inputs()
    for s_scale in (1.0, 0.6):
        ours = adapter.image_tokens(face, hidden, s_scale)
        theirs = reference.diffusers_faceid_plus_tokens(ref, face, hidden, True, s_scale)
        assert ours.shape == (2, 4, lay["cross_dim"])
        assert (ours - theirs).abs().max() < TOL, (layout, s_scale, (ours - theirs).abs().max())
    # v1 (no shortcut) is the resampler alone; the shortcut changes the tokens
    v1 = ipa.IPAdapter(variants.Variant("faceid_plus", 512, 4, lay["cross_dim"], 1280), adapter.proj, adapter.kv)
    plain = v1.image_tokens(face, hidden)
    assert (plain - reference.diffusers_faceid_plus_tokens(ref, face, hidden, False, 1.0)).abs().max() < TOL
    assert (plain - adapter.image_tokens(face, hidden)).abs().max() > 0.1


def test_plusv2_attention_output_matches_diffusers_processor(plusv2):
    """Z = Attention(Q, K, V) + λ·Attention(Q, K', V') at the first and the last cross-attention, cond and uncond
    (uncond: zero face embedding, hidden states of a zero image, as the authors' get_image_embeds)."""
    from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor2_0

    layout, adapter, ref, lay, _sd = plusv2
    face, hidden = _inputs(1, 1)
    clip_neg = torch.randn(1, 257, 1280, generator=torch.Generator().manual_seed(9))
    tokens, negative = adapter.image_tokens(face, hidden, 0.8), adapter.negative_tokens(face, clip_neg, 0.8)
    ref_tokens = reference.diffusers_faceid_plus_tokens(ref, face, hidden, True, 0.8)
    ref_negative = reference.diffusers_faceid_plus_tokens(ref, torch.zeros_like(face), clip_neg, True, 0.8)
    g = torch.Generator().manual_seed(2)
    for n in (0, len(lay["layers"]) - 1):
        inner, lam = lay["layers"][n], 0.7
        attn = Attention(query_dim=inner, cross_attention_dim=lay["cross_dim"], heads=inner // 64, dim_head=64,
                         processor=IPAdapterAttnProcessor2_0(inner, lay["cross_dim"], num_tokens=4, scale=lam))
        with torch.no_grad():
            for p in attn.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            attn.processor.to_k_ip[0].weight.copy_(adapter.kv[n][0])
            attn.processor.to_v_ip[0].weight.copy_(adapter.kv[n][1])
            x = torch.randn(1, 48, inner, generator=g)
            text = torch.randn(1, 77, lay["cross_dim"], generator=g)
            q, k, v = attn.to_q(x), attn.to_k(text), attn.to_v(text)
            (term,) = ipa.layer_terms(ipa.IPAdapter(adapter.variant, adapter.proj, (adapter.kv[n],)), tokens,
                                      negative, lam, 10.0, 0.0, None)
            patch = ipa.IPAttentionPatch((term,))
            for chunk, ip in ((0, ref_tokens), (1, ref_negative)):
                opts = {"n_heads": inner // 64, "sigmas": torch.tensor([5.0]), "cond_or_uncond": [chunk]}
                ours = attn.to_out[0](patch(q, k, v, opts))
                theirs = attn(x, encoder_hidden_states=(text, [ip]))
                assert (ours - theirs).abs().max() < TOL, (layout, n, chunk, (ours - theirs).abs().max())


def test_sd15_rename_agrees_with_diffusers_own_converter(plusv2):
    """The key renames of reference.diffusers_faceid_plus against diffusers' converter (4-layer SD1.5 file)."""
    from diffusers.loaders.unet import UNet2DConditionLoadersMixin

    layout, _adapter, ref, _lay, sd = plusv2
    if layout != "sd15":
        pytest.skip("diffusers' converter builds 4-layer resamplers only")
    conv = UNet2DConditionLoadersMixin._convert_ip_adapter_image_proj_to_diffusers(None, _proj(sd), False)
    assert conv.state_dict().keys() == ref.state_dict().keys()
    assert all(torch.equal(conv.state_dict()[k], ref.state_dict()[k]) for k in conv.state_dict())


def test_portrait_is_one_token_group_per_face():
    """FaceID Portrait (16 tokens, no LoRA): N faces -> N groups of 16 tokens, each the face's own projection (the
    authors' IPAdapterFaceID with a (1, N, 512) input reshapes the N projections to (1, N·16, C))."""
    sd = random_state_dict("faceid", 512, SD15_LAYERS, cross_dim=768, tokens=16, seed=2)
    a = ipa.from_state_dict(sd, "ip-adapter-faceid-portrait_sd15.bin")
    assert a.variant.name == "faceid_portrait" and a.variant.input_kind == "face" and not a.lora
    face = torch.randn(3, 512, generator=torch.Generator().manual_seed(0))
    tokens = a.image_tokens(face)
    assert tokens.shape == (3, 16, 768)
    assert torch.allclose(tokens[1], a.image_tokens(face[1:2])[0], atol=1e-6)
    (term,) = ipa.layer_terms(ipa.IPAdapter(a.variant, a.proj, a.kv[:1]), tokens, a.negative_tokens(face), 1.0, 1, 0,
                              None)
    assert term.k.shape == (1, 48, 320) and term.k_neg.shape == (1, 48, 320)
    with_lora = random_state_dict("faceid", 512, SD15_LAYERS[:1], cross_dim=768, tokens=16, lora_rank=2)
    assert ipa.from_state_dict(with_lora, "x.bin").variant.name == "faceid"


@pytest.mark.parametrize("kind,kw,name,expect", [
    ("plain", {}, "ip-adapter_sd15.safetensors", "plain"),
    ("plus", {}, "ip-adapter-plus-face_sd15.safetensors", "plus"),
    ("full", {}, "ip-adapter-full-face_sd15.safetensors", "full"),
    ("faceid", {"lora_rank": 2}, "ip-adapter-faceid_sdxl.bin", "faceid"),
    ("faceid_plus", {"depth": 1, "inner": 128}, "ip-adapter-faceid-plus_sd15.bin", "faceid_plus"),
    ("faceid_plus", {"depth": 1, "inner": 128}, "ip-adapter-faceid-plusv2_sdxl.bin", "faceid_plusv2"),
])
@pytest.mark.parametrize("cross", [768, 2048])
def test_every_variant_recognised_by_its_keys(kind, kw, name, expect, cross):
    sd = random_state_dict(kind, 64 if kind not in ("faceid", "faceid_plus") else 512, [320, 640], cross_dim=cross,
                           clip_dim=96, **kw)
    a = ipa.from_state_dict(sd, name)
    assert a.variant.name == expect and a.variant.cross_dim == cross
    assert a.variant.title.endswith("(SD1.5)" if cross == 768 else "(SDXL)")


@pytest.mark.parametrize("extra,name", [
    ({"id_adapter.0.weight": torch.zeros(2, 2)}, "PuLID"),
    ({"double_blocks.0.processor.ip_adapter_double_stream_k_proj.weight": torch.zeros(2, 2)}, "XLabs FLUX"),
    ({"image_proj.time_embedding.linear_1.weight": torch.zeros(2, 2)}, "SD3.5 IP-Adapter"),
])
def test_unsupported_layouts_are_refused_by_name(extra, name):
    sd = random_state_dict("plain", 64, [320], cross_dim=768) | extra
    with pytest.raises(ValueError, match=rf"{name}.*does not load.*supported are IP-Adapter plain"):
        ipa.from_state_dict(sd, "x.bin")
    instantid = random_state_dict("plus", 512, [1280], cross_dim=2048, tokens=16)
    with pytest.raises(ValueError, match=r"InstantID's IP-Adapter.*FaceID Plus v2"):
        ipa.from_state_dict(instantid, "ip-adapter.bin")
    broken = {k: v for k, v in random_state_dict("faceid_plus", 512, [320], depth=1, inner=128).items()
              if not k.startswith("image_proj.perceiver_resampler.proj_in")}
    with pytest.raises(ValueError, match=r"unsupported IP-Adapter image projection.*FaceID Plus v2") as e:
        ipa.from_state_dict(broken, "x.bin")
    assert "load_state_dict" not in str(e.value) and "Unexpected key" not in str(e.value)


def test_weights_kept_in_the_model_dtype_at_half_the_bytes():
    """SDXL plus layout (16 tokens of 2048, two of its cross-attentions, a LoRA): float16 holds half the bytes of
    float32 (bench/bench_ipadapter_memory.py measures the full-size files)."""
    sd = random_state_dict("plus", 1280, SDXL_LAYERS[-2:], cross_dim=2048, tokens=16, depth=1, inner=128,
                           lora_rank=4)
    f32, f16 = ipa.from_state_dict(sd, "a.bin"), ipa.from_state_dict(sd, "a.bin", torch.float16)
    assert {p.dtype for p in f16.proj.parameters()} == {torch.float16} and f16.kv[0][0].dtype == torch.float16
    assert f16.resident_bytes() * 2 == f32.resident_bytes()
    x = torch.randn(1, 257, 1280)
    assert f16.image_tokens(x).dtype == torch.float32
    assert (f16.image_tokens(x) - f32.image_tokens(x)).abs().max() < 0.05
    (term,) = ipa.layer_terms(ipa.IPAdapter(f16.variant, f16.proj, f16.kv[:1]), f16.image_tokens(x),
                              f16.negative_tokens(x), 1.0, 1, 0, None)
    assert term.k.dtype == torch.float32
