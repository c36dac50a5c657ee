"""Face0's three-way guider inside the graphs people build (issue 21): CFG patches, ControlNet, regional prompts.

Real core nodes on the tiny SD1.5 checkpoint and the tiny random ControlNet (scripts/facecond_dev/tiny_model.py).
At c < 1 each result is compared with a reference written here: a guider that evaluates the four branches with
``calc_cond_batch``, mixes ε̃ by the paper's formula and applies the patch's own maths to [ε̃, ε(∅)] (pre-CFG) or
as the ``sampler_cfg_function`` (RescaleCFG), or with the same guider on conditionings wired by hand as the rule
says. At c = 1 every graph must equal KSampler bit for bit.
"""

from __future__ import annotations

import copy

import comfy.sample
import comfy.samplers
import comfy_extras.nodes_post_processing  # noqa: F401 (first: on 0.28 it and nodes_latent import each other)
import pytest
import torch
from comfy_extras.nodes_apg import APG, project
from comfy_extras.nodes_latent import LatentApplyOperationCFG, LatentOperationTonemapReinhard
from comfy_extras.nodes_model_advanced import RescaleCFG

import nodes
from facecond.nodes.face0.guidance import ThreeWayCFGSampler
from facecond.nodes.face0.projection import ProjectToContext
from facecond.py.face0.projection import ProjectionInfo, random_projection
from facecond.py.faces.types import FaceEmbeds

D = 128
STEPS = 3
W, C, A = 7.5, 0.4, 0.5  # c < 1 with all four branches


@pytest.fixture(scope="module")
def conds(tiny_model):
    _, clip, _ = tiny_model
    x = torch.nn.functional.normalize(torch.randn(1, D, generator=torch.Generator().manual_seed(0)), dim=-1)
    proj = random_projection(ProjectionInfo(embedder="test/embedder", embed_dim=D), seed=0)
    with torch.inference_mode():
        text = nodes.CLIPTextEncode().encode(clip, "a photo of a person")[0]
        other = nodes.CLIPTextEncode().encode(clip, "a red hat")[0]
        outs = ProjectToContext().project(text, FaceEmbeds(x, "test/embedder", True, (0,)), proj, clip, "each")
    return dict(zip(("positive", "text_only", "face_only", "negative"), outs)) | {"other": other}


def _latent():
    return nodes.EmptyLatentImage().generate(64, 64, 1)[0]


def _three_way(model, cd, c=C, a=A, seed=5):
    with torch.inference_mode():
        return ThreeWayCFGSampler().sample(model, seed, STEPS, W, c, a, "euler", "normal", cd["positive"],
                                           cd["text_only"], cd["face_only"], cd["negative"], _latent())[0]["samples"]


def _ksampler(model, cd, seed=5):
    with torch.inference_mode():
        return nodes.KSampler().sample(model, seed, STEPS, W, "euler", "normal", cd["positive"], cd["negative"],
                                       _latent())[0]["samples"]


def _snapshot(cd):
    """What must not change: list lengths, tensor identities and values, dict keys and value identities."""
    return {k: [(t[0], t[0].clone(), dict(t[1]), copy.copy(t[1])) for t in v] for k, v in cd.items()}


def _assert_unchanged(cd, snap):
    for k, entries in snap.items():
        assert len(cd[k]) == len(entries), k
        for (ctx, opts), (ctx0, values0, opts_ref, _) in zip(cd[k], entries):
            assert ctx is ctx0 and torch.equal(ctx, values0), k
            assert opts.keys() == opts_ref.keys() and all(opts[x] is opts_ref[x] for x in opts), k


# --- references --------------------------------------------------------------------------------------------------

def _plain_cfg(cond, uncond, x, sigma):
    return uncond + (cond - uncond) * W


def _latent_op_cfg(op):
    def ref(cond, uncond, x, sigma):  # comfy_extras/nodes_latent.py LatentApplyOperationCFG, two conds
        return _plain_cfg(op(latent=cond - uncond) + uncond, uncond, x, sigma)
    return ref


def _apg(eta, norm_threshold):
    def ref(cond, uncond, x, sigma):  # comfy_extras/nodes_apg.py APG.pre_cfg_function, momentum 0
        guidance = cond - uncond
        norm = guidance.norm(p=2, dim=[-1, -2, -3], keepdim=True)
        guidance = guidance * torch.minimum(torch.ones_like(norm), norm_threshold / norm)
        parallel, orthogonal = project(guidance, cond)
        cond = (uncond + orthogonal + eta * parallel) + (cond - uncond) / W
        return _plain_cfg(cond, uncond, x, sigma)
    return ref


def _rescale(multiplier):
    def ref(cond, uncond, x_orig, sigma):  # comfy_extras/nodes_model_advanced.py RescaleCFG, on v-prediction
        sigma = sigma.view(sigma.shape[:1] + (1,) * (cond.ndim - 1))
        x = x_orig / (sigma * sigma + 1.0)
        v_cond = (x - cond) * (sigma ** 2 + 1.0) ** 0.5 / sigma  # x0 = x_orig - eps·sigma, eps = x_orig - x0
        v_uncond = (x - uncond) * (sigma ** 2 + 1.0) ** 0.5 / sigma
        v_cfg = v_uncond + W * (v_cond - v_uncond)
        v_rescaled = v_cfg * (v_cond.std(dim=(1, 2, 3), keepdim=True) / v_cfg.std(dim=(1, 2, 3), keepdim=True))
        v_final = multiplier * v_rescaled + (1.0 - multiplier) * v_cfg
        return x - v_final * sigma / (sigma * sigma + 1.0) ** 0.5
    return ref


class _Reference(comfy.samplers.CFGGuider):
    """Face0 §3.3 by hand: the four branches from calc_cond_batch, ε̃ = c·ε(d,f) + (1-c)(1-a)·ε(d) + (1-c)a·ε(f)
    (on x0, the same affine mix), then ``guidance(ε̃, ε(∅), x, sigma)`` for the final x0."""

    def __init__(self, model, cd, guidance):
        super().__init__(model)
        self.guidance = guidance
        self.inner_set_conds({k: cd[k] for k in ("positive", "negative", "text_only", "face_only")})

    def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006
        p, n, t, f = (self.conds[k] for k in ("positive", "negative", "text_only", "face_only"))
        tf, uncond, text, face = comfy.samplers.calc_cond_batch(self.inner_model, [p, n, t, f], x, timestep,
                                                                model_options)
        tilde = C * tf + (1 - C) * (1 - A) * text + (1 - C) * A * face
        return self.guidance(tilde, uncond, x, timestep)


def _reference(model, cd, guidance, seed=5):
    g = _Reference(model, cd, guidance)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", STEPS).cpu()
    latent = _latent()["samples"]
    noise = comfy.sample.prepare_noise(latent, seed)
    with torch.inference_mode():
        return g.sample(noise, latent, comfy.samplers.sampler_object("euler"), sigmas, disable_pbar=True, seed=seed)


def _mean_abs(x, y):
    return float((x - y).abs().mean())


# --- CFG patches -------------------------------------------------------------------------------------------------

def _patches():
    op = LatentOperationTonemapReinhard.execute(0.5).args[0]
    return {
        "LatentApplyOperationCFG": (lambda m: LatentApplyOperationCFG.execute(m, op).args[0], _latent_op_cfg(op)),
        "APG": (lambda m: APG.execute(m, 0.3, 2.0, 0.0).args[0], _apg(0.3, 2.0)),
        "RescaleCFG": (lambda m: RescaleCFG().patch(m, 0.7)[0], _rescale(0.7)),
    }


@pytest.mark.parametrize("name", ["LatentApplyOperationCFG", "APG", "RescaleCFG"])
def test_cfg_patch_at_c_below_1_acts_on_the_combined_prediction(tiny_model, conds, name):
    """The patch sees [ε̃, ε(∅)] as it sees [cond, uncond] under KSampler, and c = 1 stays KSampler exactly."""
    model = tiny_model[0]
    patch, math = _patches()[name]
    patched = patch(model)
    snap = _snapshot(conds)
    ours = _three_way(patched, conds)
    want, plain = _reference(model, conds, math), _reference(model, conds, _plain_cfg)
    torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-4, msg=lambda m: (
        f"{name} at c={C}: mean |Δ| from the reference {_mean_abs(ours, want):.4g}, the patch's own effect "
        f"{_mean_abs(want, plain):.4g}\n{m}"))
    assert _mean_abs(want, plain) > 1e-2  # the patch does something measurable here
    assert torch.equal(_three_way(patched, conds, c=1.0), _ksampler(patched, conds))
    _assert_unchanged(conds, snap)


# --- ControlNet ----------------------------------------------------------------------------------------------------

def _hint():
    g = torch.Generator().manual_seed(3)
    return torch.rand(1, 64, 64, 3, generator=g)  # IMAGE, (B, H, W, C)


def _with_controlnet(cnet, cd):
    pos, neg = nodes.ControlNetApplyAdvanced().apply_controlnet(cd["positive"], cd["negative"], cnet, _hint(), 0.9,
                                                                0.0, 1.0)
    return dict(cd, positive=pos, negative=neg)


def _recording(model):
    """A clone whose U-Net calls are recorded as (branches in the batch, ControlNet residuals present)."""
    calls = []

    def wrapper(apply_model, args):
        calls.append((tuple(args["cond_or_uncond"]), args["c"].get("control") is not None))
        return apply_model(args["input"], args["timestep"], **args["c"])

    m = model.clone()
    m.set_model_unet_function_wrapper(wrapper)
    return m, calls


def test_controlnet_wired_as_for_ksampler_reaches_all_four_branches(tiny_model, tiny_controlnet, conds):
    model = tiny_model[0]
    wired = _with_controlnet(tiny_controlnet, conds)
    snap = _snapshot(wired)
    m, calls = _recording(model)
    ours = _three_way(m, wired)
    # by hand: the same ControlNet applied to text_only and face_only too (one call, so one shared ControlNet object)
    every, neg = nodes.ControlNetApplyAdvanced().apply_controlnet(
        conds["positive"] + conds["text_only"] + conds["face_only"], conds["negative"], tiny_controlnet, _hint(), 0.9,
        0.0, 1.0)
    by_hand = dict(positive=[every[0]], text_only=[every[1]], face_only=[every[2]], negative=neg)
    assert all(e[1]["control"] is neg[0][1]["control"] for e in every)
    want = _three_way(model, by_hand)
    effect = _mean_abs(_ksampler(model, wired), _ksampler(model, conds))
    assert torch.equal(ours, want), (f"mean |Δ| from ControlNet on every branch {_mean_abs(ours, want):.4g}; the "
                                     f"ControlNet's whole effect under KSampler {effect:.4g}")
    # one batch of four per step, every branch with the ControlNet's residuals
    assert len(calls) == STEPS and all(sorted(b) == [0, 1, 2, 3] and ctl for b, ctl in calls), calls
    assert _mean_abs(ours, _three_way(model, conds)) > 1e-2  # the ControlNet acts at c < 1
    assert torch.equal(_three_way(model, wired, c=1.0), _ksampler(model, wired))
    _assert_unchanged(wired, snap)


def test_controlnet_applied_before_projection_is_kept_not_applied_twice(tiny_model, tiny_controlnet, conds):
    """ControlNet on the text before ProjectToContext: text_only keeps its own; face_only takes positive's."""
    model, clip, _ = tiny_model
    text = nodes.CLIPTextEncode().encode(clip, "a photo of a person")[0]
    controlled = nodes.ControlNetApplyAdvanced().apply_controlnet(text, text, tiny_controlnet, _hint(), 0.9, 0.0,
                                                                  1.0)[0]
    x = torch.nn.functional.normalize(torch.randn(1, D, generator=torch.Generator().manual_seed(0)), dim=-1)
    proj = random_projection(ProjectionInfo(embedder="test/embedder", embed_dim=D), seed=0)
    with torch.inference_mode():
        outs = ProjectToContext().project(controlled, FaceEmbeds(x, "test/embedder", True, (0,)), proj, clip, "each")
    cd = dict(zip(("positive", "text_only", "face_only", "negative"), outs))
    cnet = cd["positive"][0][1]["control"]
    assert cd["text_only"][0][1]["control"] is cnet and "control" not in cd["face_only"][0][1]
    m, calls = _recording(model)
    ours = _three_way(m, cd)
    # the unconditional has no ControlNet (as under KSampler with this wiring), the three conditionals have it
    assert all(ctl == (1 not in b) for b, ctl in calls), calls
    assert sorted(b for c in calls for b in c[0]) == sorted([0, 1, 2, 3] * STEPS)
    by_hand = dict(cd, face_only=[[cd["face_only"][0][0], dict(cd["face_only"][0][1], control=cnet,
                                                                control_apply_to_uncond=False)]])
    assert torch.equal(ours, _three_way(model, by_hand))
    assert torch.equal(_three_way(model, cd, c=1.0), _ksampler(model, cd))


# --- regional prompts ------------------------------------------------------------------------------------------------

def _mask():
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :40] = 1
    return mask


@pytest.mark.parametrize("region_first", [False, True])
def test_area_and_mask_on_positive_follow_the_rule(tiny_model, conds, region_first):
    """positive = ProjectToContext's positive in a mask + another prompt in an area. The rule: the face entry's mask
    goes to its text_only / face_only counterparts; the area prompt (not from ProjectToContext) joins both as it is.
    Combine order does not matter (entries are matched by ProjectToContext's mark, not by position)."""
    model = tiny_model[0]
    area = nodes.ConditioningSetArea().append(conds["other"], 32, 32, 32, 0, 1.0)[0]

    def masked(cond):
        return nodes.ConditioningSetMask().append(cond, _mask(), "default", 1.0)[0]

    def combine(face_part):
        pair = (area, face_part) if region_first else (face_part, area)
        return nodes.ConditioningCombine().combine(*pair)[0]

    wired = dict(conds, positive=combine(masked(conds["positive"])))
    snap = _snapshot(wired)
    ours = _three_way(model, wired)
    by_hand = dict(wired, text_only=combine(masked(conds["text_only"])), face_only=combine(masked(conds["face_only"])))
    assert torch.equal(ours, _three_way(model, by_hand))
    assert not torch.equal(ours, _three_way(model, dict(conds, positive=combine(conds["positive"]))))
    assert torch.equal(_three_way(model, wired, c=1.0), _ksampler(model, wired))
    _assert_unchanged(wired, snap)


def test_hooks_and_timestep_range_on_positive_reach_text_and_face_branches(tiny_model, tiny_ckpt, conds):
    """Core ConditioningSetTimestepRange and ConditioningSetProperties (a hook group from
    CreateHookModelAsLoraModelOnly) on positive only: the guider's text_only and face_only carry the same range and
    hook group (copies of the options, the same objects), negative keeps its own, the inputs are unchanged, and the
    three-way sampler runs the hooked graph at c < 1."""
    from comfy_extras.nodes_hooks import ConditioningSetProperties, CreateHookModelAsLoraModelOnly

    from facecond.nodes.face0.branches import conditional_branch

    hooks = CreateHookModelAsLoraModelOnly().create_hook_model_only(tiny_ckpt, 0.5)[0]
    ranged = nodes.ConditioningSetTimestepRange().set_range(conds["positive"], 0.0, 0.6)[0]
    positive = ConditioningSetProperties().set_properties(ranged, 1.0, "default", hooks=hooks)[0]
    before = copy.copy([dict(o) for _, o in conds["text_only"]])
    for name in ("text_only", "face_only"):
        branch = conditional_branch(positive, conds[name])
        assert len(branch) == 1 and branch[0][0] is conds[name][0][0]
        opts = branch[0][1]
        assert opts["hooks"] is positive[0][1]["hooks"] and (opts["start_percent"], opts["end_percent"]) == (0.0, 0.6)
    assert [dict(o) for _, o in conds["text_only"]] == before and "hooks" not in conds["face_only"][0][1]
    assert "hooks" not in conds["negative"][0][1]
    model = tiny_model[0]
    out = _three_way(model, dict(conds, positive=positive))
    plain = _three_way(model, conds)
    assert torch.isfinite(out).all() and not torch.equal(out, plain)
