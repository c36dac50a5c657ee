"""Face0 nodes in-process on the tiny SD1.5 checkpoint: ProjectToContext, the three-way guider and sampler,
and the embedding nodes. Real ComfyUI objects throughout; model calls are observed through ComfyUI's own
``model_function_wrapper`` and CFG hooks."""

from __future__ import annotations

import comfy.samplers
import pytest
import torch
from comfy_extras.nodes_custom_sampler import Noise_RandomNoise, SamplerCustomAdvanced
from comfy_extras.nodes_model_advanced import RescaleCFG

import nodes
from facecond.nodes.face0.guidance import Guider_Face0ThreeWay, ThreeWayCFGSampler, ThreeWayGuider
from facecond.nodes.face0.projection import ProjectToContext
from facecond.py.face0.projection import (
    ProjectionInfo,
    random_projection,
)
from facecond.py.faces.types import FaceEmbeds

D = 128
STEPS = 3


def _embeds(n, seed=0, model="test/embedder"):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, D, generator=g), dim=-1)
    return FaceEmbeds(embeds=x, model=model, normalized=True, source_index=tuple(range(n)))


@pytest.fixture(scope="module")
def conds(tiny_model, projection):
    _, clip, _ = tiny_model
    with torch.inference_mode():
        text = nodes.CLIPTextEncode().encode(clip, "a photo of a person")[0]
        outs = ProjectToContext().project(text, _embeds(1), projection, clip, "each")
    return dict(zip(("positive", "text_only", "face_only", "negative"), outs)) | {"text": text}


def _latent(batch=1):
    return nodes.EmptyLatentImage().generate(64, 64, batch)[0]


def _three_way(model, conds, c, a, cfg=7.5, sampler="euler", seed=5, latent=None):
    with torch.inference_mode():
        return ThreeWayCFGSampler().sample(model, seed, STEPS, cfg, c, a, sampler, "normal", conds["positive"],
                                           conds["text_only"], conds["face_only"], conds["negative"],
                                           latent or _latent())[0]["samples"]


def _ksampler(model, conds, cfg=7.5, sampler="euler", seed=5, positive=None):
    with torch.inference_mode():
        return nodes.KSampler().sample(model, seed, STEPS, cfg, sampler, "normal", positive or conds["positive"],
                                       conds["negative"], _latent())[0]["samples"]


# --- ProjectToContext -------------------------------------------------------------------------------------

def test_project_overrides_last_three_tokens_and_copies(tiny_model, projection, conds):
    text = conds["text"]
    before = text[0][0].clone(), dict(text[0][1])
    pos, text_only, face_only, neg = (conds[k] for k in ("positive", "text_only", "face_only", "negative"))
    ctx = text[0][0]
    assert ctx.shape == (1, 77, 768)
    tok = projection(_embeds(1).embeds)[0].to(ctx.dtype)
    # positions 0..73 untouched, 74..76 (tokens 75-77) replaced, exactly
    assert torch.equal(pos[0][0][:, :74], ctx[:, :74])
    torch.testing.assert_close(pos[0][0][0, 74:], tok)
    assert torch.equal(text_only[0][0][:, :74], ctx[:, :74]) and torch.count_nonzero(text_only[0][0][:, 74:]) == 0
    assert torch.count_nonzero(neg[0][0][:, 74:]) == 0 and torch.equal(face_only[0][0][0, 74:], pos[0][0][0, 74:])
    assert not torch.equal(face_only[0][0][:, :74], ctx[:, :74])  # empty text, not the prompt
    # the input conditioning is untouched and the option dicts are copies
    assert torch.equal(text[0][0], before[0]) and text[0][1] == before[1]
    assert pos[0][1] is not text[0][1] and torch.equal(pos[0][1]["pooled_output"], text[0][1]["pooled_output"])


def test_project_batches(tiny_model, projection):
    _, clip, _ = tiny_model
    with torch.inference_mode():
        text = nodes.CLIPTextEncode().encode(clip, "a photo of a person")[0]
        pos = ProjectToContext().project(text, _embeds(3), projection, clip, "each")[0]
        assert pos[0][0].shape == (3, 77, 768)  # N faces x one prompt -> batch of N
        for i in range(3):
            torch.testing.assert_close(pos[0][0][i, 74:], projection(_embeds(3).embeds[i:i + 1])[0])
        # long prompts: test_long_prompt_keeps_every_prompt_token_and_eos
        two = [[torch.cat([text[0][0]] * 2), text[0][1]]]
        with pytest.raises(ValueError, match="3 face embeddings for a conditioning batch of 2"):
            ProjectToContext().project(two, _embeds(3), projection, clip, "each")


def test_project_bad_inputs_name_node_input_and_fix(tiny_model, projection, conds):
    _, clip, _ = tiny_model
    text = conds["text"]
    node = ProjectToContext()
    with pytest.raises(ValueError, match=r"ProjectToContext: input 'face_embeds' holds 64-d .* takes 128-d"):
        node.project(text, FaceEmbeds(torch.randn(1, 64), "test/embedder", False, (0,)), projection, clip, "each")
    with pytest.raises(ValueError, match="ProjectToContext: input 'face_embeds' is empty"):
        node.project(text, FaceEmbeds(torch.zeros(0, D), "test/embedder", False, ()), projection, clip, "each")
    nan = _embeds(2).embeds.clone()
    nan[1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"rows \[1\] contain NaN"):
        node.project(text, FaceEmbeds(nan, "test/embedder", True, (0, 1)), projection, clip, "each")
    with pytest.raises(ValueError, match="'other/model' but the projection takes 128-d embeddings from 'test/emb"):
        node.project(text, _embeds(1, model="other/model"), projection, clip, "each")
    sd2 = random_projection(ProjectionInfo(embedder="test/embedder", embed_dim=D, context_dim=1024, base_model="sd2"))
    with pytest.raises(ValueError, match=r"context width 768 .* 1024-wide tokens \(base model 'sd2'\)"):
        node.project(text, _embeds(1), sd2, clip, "each")


# --- three-way guidance -----------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_c1_matches_ksampler_exactly(tiny_model, conds, sampler):
    model = tiny_model[0]
    ours = _three_way(model, conds, c=1.0, a=0.5, sampler=sampler)
    theirs = _ksampler(model, conds, sampler=sampler)
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, _three_way(model, conds, c=0.5, a=0.5, sampler=sampler))


def _counting(model):
    """A clone whose U-Net calls are recorded: (batch size, cond_or_uncond) per call, via ComfyUI's wrapper."""
    calls = []

    def wrapper(apply_model, args):
        calls.append((args["input"].shape[0], tuple(args["cond_or_uncond"])))
        return apply_model(args["input"], args["timestep"], **args["c"])

    m = model.clone()
    m.set_model_unet_function_wrapper(wrapper)
    return m, calls


@pytest.mark.parametrize(("c", "a", "branches"), [
    (1.0, 0.3, (0, 1)),          # plain CFG: cond + uncond, as KSampler
    (0.5, 0.0, (0, 1, 2)),       # face-only weight 0: not evaluated
    (0.5, 1.0, (0, 1, 3)),       # text-only weight 0
    (0.0, 0.0, (1, 2)),          # text+face weight 0
    (0.4, 0.5, (0, 1, 2, 3)),    # all four
])
def test_zero_weight_branches_not_evaluated(tiny_model, conds, c, a, branches):
    m, calls = _counting(tiny_model[0])
    _three_way(m, conds, c=c, a=a)
    assert len(calls) == STEPS  # one batched U-Net call per step
    assert all(sorted(cu) == list(branches) and bs == len(branches) for bs, cu in calls), calls
    if c == 1.0:
        mk, kcalls = _counting(tiny_model[0])
        _ksampler(mk, conds)
        assert kcalls == calls


def test_guider_output_is_the_formula_of_its_branches(tiny_model, conds):
    """Branch outputs (x0) recorded at the U-Net, combined by hand, equal what the guider hands to CFG hooks."""
    w, c, a = 6.0, 0.4, 0.3
    m, _ = _counting(tiny_model[0])
    per_step, checked = [], []

    def wrapper(apply_model, args):
        out = apply_model(args["input"], args["timestep"], **args["c"])
        per_step.append(dict(zip(args["cond_or_uncond"], out.chunk(len(args["cond_or_uncond"])))))
        return out

    def pre_cfg(args):  # as under plain CFG: [cond, uncond] = [ε̃, ε(∅)], conds [positive, negative] (issue 21)
        br = per_step[-1]
        tilde = c * br[0] + (1 - c) * (a * br[3] + (1 - a) * br[2])
        assert len(args["conds_out"]) == 2 and args["cond_scale"] == w and len(args["conds"]) == 2
        torch.testing.assert_close(args["conds_out"][0], tilde)
        torch.testing.assert_close(args["conds_out"][1], br[1])
        return args["conds_out"]

    def post_cfg(args):
        br = per_step[-1]  # 0: text+face, 1: uncond, 2: text, 3: face
        tilde = c * br[0] + (1 - c) * (a * br[3] + (1 - a) * br[2])
        torch.testing.assert_close(args["cond_denoised"], tilde)
        torch.testing.assert_close(args["uncond_denoised"], br[1])
        torch.testing.assert_close(args["denoised"], w * tilde + (1 - w) * br[1], rtol=1e-4, atol=1e-4)
        checked.append(True)
        return args["denoised"]

    m.set_model_unet_function_wrapper(wrapper)
    m.set_model_sampler_pre_cfg_function(pre_cfg)
    m.set_model_sampler_post_cfg_function(post_cfg)
    _three_way(m, conds, c=c, a=a, cfg=w)
    assert len(checked) == STEPS


def test_post_cfg_hook_changes_result_and_cfg_patch_matches_ksampler(tiny_model, conds):
    model = tiny_model[0]
    m = model.clone()
    m.set_model_sampler_post_cfg_function(lambda args: args["denoised"] * 0.5)
    assert not torch.equal(_three_way(m, conds, 1.0, 0.0), _three_way(model, conds, 1.0, 0.0))
    assert torch.equal(_three_way(m, conds, 1.0, 0.0), _ksampler(m, conds))
    rescaled = RescaleCFG().patch(model, 0.7)[0]  # a real sampler_cfg_function patch
    assert torch.equal(_three_way(rescaled, conds, 1.0, 0.0), _ksampler(rescaled, conds))
    assert torch.isfinite(_three_way(rescaled, conds, 0.4, 0.5)).all()


def test_masked_conds_match_ksampler_and_run_three_way(tiny_model, conds):
    model = tiny_model[0]
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :32] = 1
    masked = nodes.ConditioningSetMask().append(conds["positive"], mask, "default", 1.0)[0]
    area = nodes.ConditioningSetArea().append(conds["text"], 32, 32, 32, 0, 1.0)[0]
    positive = nodes.ConditioningCombine().combine(masked, area)[0]
    both = dict(conds, positive=positive)
    assert torch.equal(_three_way(model, both, 1.0, 0.0), _ksampler(model, both, positive=positive))
    out = _three_way(model, both, 0.5, 0.5)
    assert torch.isfinite(out).all() and not torch.equal(out, _three_way(model, conds, 0.5, 0.5))


def test_guider_node_with_sampler_custom_advanced_equals_all_in_one(tiny_model, conds):
    model = tiny_model[0]
    c, a, seed = 0.4, 0.5, 11
    guider = ThreeWayGuider().get_guider(model, conds["positive"], conds["negative"], 7.5, c, a,
                                         text_only=conds["text_only"], face_only=conds["face_only"])[0]
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", STEPS).cpu()
    with torch.inference_mode():
        out = SamplerCustomAdvanced.execute(Noise_RandomNoise(seed), guider, comfy.samplers.sampler_object("euler"),
                                            sigmas, _latent())
    assert torch.equal(out.args[0]["samples"], _three_way(model, conds, c, a, seed=seed))
    with pytest.raises(ValueError, match="connect ProjectToContext's face_only"):
        ThreeWayGuider().get_guider(model, conds["positive"], conds["negative"], 7.5, 0.4, 0.5,
                                    text_only=conds["text_only"])


@pytest.mark.parametrize("c, a", [(1.0, 0.0), (0.4, 0.5)])
def test_guider_set_cfg_and_set_conds_in_either_order(tiny_model, conds, c, a):
    model = tiny_model[0]
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", STEPS).cpu()
    extra = {"text_only": conds["text_only"], "face_only": conds["face_only"]}
    cfg_first, conds_first = Guider_Face0ThreeWay(model), Guider_Face0ThreeWay(model)
    cfg_first.set_cfg(7.5, c, a)
    cfg_first.set_conds(conds["positive"], conds["negative"], **extra)
    conds_first.set_conds(conds["positive"], conds["negative"], **extra)
    conds_first.set_cfg(7.5, c, a)
    assert list(cfg_first.original_conds) == list(conds_first.original_conds)
    with torch.inference_mode():
        out = [SamplerCustomAdvanced.execute(Noise_RandomNoise(3), g, comfy.samplers.sampler_object("euler"), sigmas,
                                             _latent()).args[0]["samples"] for g in (cfg_first, conds_first)]
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], _three_way(model, conds, c, a, seed=3))
    # a branch the weights need but that is not connected: the same error whichever call comes second
    g = Guider_Face0ThreeWay(model)
    g.set_cfg(7.5, 0.4, 0.5)
    with pytest.raises(ValueError, match="connect ProjectToContext's face_only"):
        g.set_conds(conds["positive"], conds["negative"], text_only=conds["text_only"])
    g = Guider_Face0ThreeWay(model)
    g.set_conds(conds["positive"], conds["negative"], text_only=conds["text_only"])
    with pytest.raises(ValueError, match="connect ProjectToContext's face_only"):
        g.set_cfg(7.5, 0.4, 0.5)


def test_batch_of_faces_samples_a_batch(tiny_model, projection, conds):
    model, clip, _ = tiny_model
    with torch.inference_mode():
        outs = ProjectToContext().project(conds["text"], _embeds(3, seed=4), projection, clip, "each")
    batch = dict(zip(("positive", "text_only", "face_only", "negative"), outs))
    out = _three_way(model, batch, 0.5, 0.5, latent=_latent(3))
    assert out.shape[0] == 3 and not torch.equal(out[0], out[1])


def test_sdxl_context_needs_2048_projection_and_keeps_pooled():
    """SDXL: CLIP-L and CLIP-G contexts concatenated to 2048, plus a pooled output (shape-level, no SDXL model)."""
    g = torch.Generator().manual_seed(0)
    text = [[torch.randn(1, 77, 2048, generator=g), {"pooled_output": torch.randn(1, 1280, generator=g)}]]
    empty = [[torch.randn(1, 77, 2048, generator=g), {"pooled_output": torch.randn(1, 1280, generator=g)}]]
    xl = random_projection(ProjectionInfo(embedder="test/embedder", embed_dim=D, context_dim=2048, base_model="sdxl"))
    pos, _, face_only, neg = ProjectToContext().project(text, _embeds(1), xl, None, "each", empty_conditioning=empty)
    # an SDXL conditioning does not show where its prompt ends (the pooled output is CLIP-G's projection, not a
    # context row), so the prompt's chunk stays whole and the face goes into an added chunk: the empty prompt's
    # encoding with all 2048 channels of its tokens 75-77 replaced
    assert pos[0][0].shape == (1, 154, 2048) and torch.equal(pos[0][0][:, :77], text[0][0])
    torch.testing.assert_close(pos[0][0][0, 77 + 74:], xl(_embeds(1).embeds)[0])
    assert torch.equal(pos[0][0][:, 77:77 + 74], empty[0][0][:, :74])
    # the empty conditioning is the empty prompt (its EOS is token 2): the face takes tokens 75-77, as in the paper
    torch.testing.assert_close(face_only[0][0][0, 74:], xl(_embeds(1).embeds)[0])
    assert face_only[0][0].shape == (1, 77, 2048) and torch.equal(face_only[0][0][:, :74], empty[0][0][:, :74])
    assert pos[0][1]["pooled_output"] is text[0][1]["pooled_output"]  # pooled output left alone
    assert face_only[0][1]["pooled_output"] is empty[0][1]["pooled_output"]
    assert torch.count_nonzero(neg[0][0][:, 74:]) == 0
    sd15 = random_projection(ProjectionInfo(embedder="test/embedder", embed_dim=D))
    with pytest.raises(ValueError, match=r"context width 2048 .* 768-wide tokens \(base model 'sd1'\)"):
        ProjectToContext().project(text, _embeds(1), sd15, None, "each", empty_conditioning=empty)
