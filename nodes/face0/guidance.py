"""Face0 sampling (Valevski et al. 2023, "Face0: Instantaneously Conditioning a Text-to-Image Model on a Face",
arXiv 2306.06638): the three-way guidance as a guider and as a KSampler-like node. The maths lives in
``py/face0/guidance.py``; these classes check inputs, call it and wrap results. The projection nodes
(LoadFace0Projection, ProjectToContext) are in ``projection.py``, the embedding nodes in ``embeddings.py``
(both beside this file).

The three-way guider combines ComfyUI's denoised (x0) predictions; the combination is affine with weights
summing to 1, hence identical to combining ε (see py/face0/guidance.py).

In a graph (issue 21): the mixed conditional ε̃ takes the place of positive's prediction everywhere ComfyUI's CFG
looks at it. Pre-CFG hooks (LatentApplyOperationCFG, APG, ...) get ``[ε̃, ε(∅)]`` with conds ``[positive,
negative]``, CFG patches (RescaleCFG, ...) and post-CFG hooks get ε̃ as ``cond_denoised``, exactly as
``comfy.samplers.sampling_function`` / ``cfg_function`` hand them cond and uncond (same code in 0.3.75 and 0.28).
What the conditioning carries (ControlNet / T2I-Adapter, GLIGEN, area, mask, strength, hooks, timestep range) on
positive also reaches text_only and face_only, copied (rule and reasons in ``branches.py``); negative keeps its own.
So a graph wired as for KSampler (ControlNetApplyAdvanced on positive and negative, regional prompts combined into
positive) is right at every c, and at c = 1 it is KSampler's result bit for bit.
"""

from __future__ import annotations

import logging

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import node_helpers

from ...py.face0.guidance import branch_weights, combine_conditional
from ..common import denoise_input, sampler_inputs, seed_input, steps_input
from ..paths import finite_floats
from .branches import conditional_branch

log = logging.getLogger("facecond")

CATEGORY = "facecond/face0"


class Guider_Face0ThreeWay(comfy.samplers.CFGGuider):
    """Face0's three-way guidance (py/face0/guidance.py) as a ComfyUI guider.

    Every branch with a non-zero weight is evaluated in one ``calc_cond_batch`` call, in the order
    [positive (d,f), negative (∅), text_only (d), face_only (f)] (a ``sampler_calc_cond_batch_function`` gets that
    list). ``combine_conditional`` mixes ε̃; then, as ``sampling_function`` does for [cond, uncond], the pre-CFG hooks
    run on ``[ε̃, ε(∅)]`` (here, as Guider_PerpNeg does, because ``sampling_function`` is skipped) and ComfyUI's own
    ``cfg_function`` finishes (``sampler_cfg_function`` patches, post-CFG hooks). text_only / face_only are
    registered completed with positive's extras (``branches.conditional_branch``).

    ``set_cfg(cfg, c, a)`` and ``set_conds(positive, negative, text_only, face_only)`` may come in either order:
    whichever comes second registers the text_only / face_only conditionings that the weights need (only those,
    so c = 1 prepares exactly what KSampler prepares) and raises if one of them is missing.
    """

    def __init__(self, model_patcher):
        super().__init__(model_patcher)
        self.extra_conds = None  # text_only / face_only as set_conds got them (None: set_conds not called yet)
        self.set_cfg(self.cfg)  # plain CFG until set_cfg says otherwise

    def set_conds(self, positive, negative, text_only=None, face_only=None):
        self.inner_set_conds({"positive": positive, "negative": negative})
        self.extra_conds = {"positive": positive, "text_only": text_only, "face_only": face_only}
        self._register_branches()

    def set_cfg(self, cfg, c=1.0, a=0.0):
        self.cfg, self.c, self.a = cfg, c, a
        self.weights = branch_weights(cfg, c, a)
        self._register_branches()

    def _register_branches(self):
        if self.extra_conds is None:
            return
        need = self.weights.needed(skip_uncond_at_cfg1=False)
        for key, weight in (("text_only", "text"), ("face_only", "face")):
            self.original_conds.pop(key, None)
            if need[weight]:
                cond = self.extra_conds[key]
                if cond is None:
                    raise ValueError(f"ThreeWayCFG: c={self.c:g}, a={self.a:g} give the {key} branch weight "
                                     f"{getattr(self.weights, weight):g}; connect ProjectToContext's {key} output.")
                cond = conditional_branch(self.extra_conds["positive"], cond)  # positive's extras, copied
                self.inner_set_conds({key: node_helpers.conditioning_set_values(cond, {"prompt_type": "positive"})})

    def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006 (ComfyUI's signature)
        need = self.weights.needed(skip_uncond_at_cfg1=not model_options.get("disable_cfg1_optimization", False))
        positive = self.conds.get("positive")
        uncond = self.conds.get("negative") if need["uncond"] else None
        conds = [positive if need["text_face"] else None, uncond,
                 self.conds.get("text_only") if need["text"] else None,
                 self.conds.get("face_only") if need["face"] else None]
        while len(conds) > 2 and conds[-1] is None:
            conds.pop()
        if "sampler_calc_cond_batch_function" in model_options:
            args = {"conds": conds, "input": x, "sigma": timestep, "model": self.inner_model,
                    "model_options": model_options}
            out = model_options["sampler_calc_cond_batch_function"](args)
        else:
            out = comfy.samplers.calc_cond_batch(self.inner_model, conds, x, timestep, model_options)
        out = list(out) + [None] * (4 - len(out))
        preds = [o if cnd is not None else None for o, cnd in zip(out, [*conds, None, None])]
        # ε̃ first; then everything after is comfy.samplers.sampling_function / cfg_function (0.3.75 and 0.28 alike)
        # with ε̃ as the cond prediction and positive as the cond it stands for: pre-CFG hooks get [ε̃, ε(∅)]
        # (LatentApplyOperationCFG, APG ... read conds_out[0] - conds_out[1] as the guidance direction).
        out = [combine_conditional(self.weights, preds[0], preds[2], preds[3]), out[1]]
        hook_conds = [positive, uncond]
        for fn in model_options.get("sampler_pre_cfg_function", []):
            args = {"conds": hook_conds, "conds_out": out, "cond_scale": self.cfg, "timestep": timestep,
                    "input": x, "sigma": timestep, "model": self.inner_model, "model_options": model_options}
            out = fn(args)
        return comfy.samplers.cfg_function(self.inner_model, out[0], out[1], self.cfg, x, timestep,
                                           model_options=model_options, cond=positive, uncond=uncond)


def _guidance_inputs():
    return {
        "cfg": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                          "tooltip": "w: classifier-free guidance scale against the unconditional (Face0: 7.5)."}),
        "c": ("FLOAT", {"default": 1.0, "min": -1.0, "max": 2.0, "step": 0.01,
                        "tooltip": "Weight of text+face in the conditional mix. 1: plain CFG, photo mode (same cost "
                                   "as KSampler); about 0.4 or less: style mode for paintings, figures..."}),
        "a": ("FLOAT", {"default": 0.0, "min": -1.0, "max": 2.0, "step": 0.01,
                        "tooltip": "Within the remaining 1-c: share of face-only vs text-only. 0: text only "
                                   "(3 branches), 1: face only (3 branches), between: 4 branches."}),
    }


_CONDS_TOOLTIPS = {
    "positive": "text + face (ProjectToContext positive). Wire it as for KSampler: ControlNet, areas, masks, "
                "hooks and other prompts combined in also reach text_only and face_only.",
    "negative": "empty text + zero face (ProjectToContext negative): the unconditional. Wire it as for KSampler "
                "(e.g. ControlNetApplyAdvanced's negative).",
    "text_only": "text + zero face (ProjectToContext text_only, straight, no ControlNet/area needed: it gets "
                 "positive's); needed when (1-c)(1-a) != 0.",
    "face_only": "empty text + face (ProjectToContext face_only, straight: it gets positive's ControlNet, areas, "
                 "masks...); needed when (1-c)a != 0.",
}

_GRAPH_RULE = (" In a graph: wire positive and negative as for KSampler. text_only and face_only get positive's "
               "ControlNet/T2I-Adapter, GLIGEN, area/mask/strength, hooks and timestep range (copied; what they "
               "carry themselves is kept), and other prompts combined into positive (regional prompts) are shared "
               "by them. Pre-CFG patches (LatentApplyOperationCFG, APG) and CFG patches (RescaleCFG) act on the "
               "mix e~ and e(0) as they act on cond and uncond under KSampler.")


class ThreeWayGuider:
    @classmethod
    def VALIDATE_INPUTS(cls, cfg=None, c=None, a=None):  # NaN/inf, min/max of float widgets
        return finite_floats(cls, "ThreeWayGuider", cfg=cfg, c=c, a=a)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model (patches on it are honoured)."}),
                "positive": ("CONDITIONING", {"tooltip": _CONDS_TOOLTIPS["positive"]}),
                "negative": ("CONDITIONING", {"tooltip": _CONDS_TOOLTIPS["negative"]}),
                **_guidance_inputs(),
            },
            "optional": {
                "text_only": ("CONDITIONING", {"tooltip": _CONDS_TOOLTIPS["text_only"]}),
                "face_only": ("CONDITIONING", {"tooltip": _CONDS_TOOLTIPS["face_only"]}),
            },
        }

    RETURN_TYPES = ("GUIDER",)
    OUTPUT_TOOLTIPS = ("For SamplerCustomAdvanced.",)
    FUNCTION = "get_guider"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Face0 three-way guidance: e~ = c·e(d,f) + (1-c)(a·e(f) + (1-a)·e(d)), "
                   "e^ = w·e~ + (1-w)·e(0). Zero-weight branches are not evaluated." + _GRAPH_RULE)

    def get_guider(self, model, positive, negative, cfg, c, a, text_only=None, face_only=None):
        guider = Guider_Face0ThreeWay(model)
        guider.set_cfg(cfg, c, a)
        guider.set_conds(positive, negative, text_only, face_only)
        return (guider,)


class ThreeWayCFGSampler:
    @classmethod
    def VALIDATE_INPUTS(cls, cfg=None, c=None, a=None, denoise=None):  # NaN/inf, min/max of float widgets
        return finite_floats(cls, "ThreeWayCFGSampler", cfg=cfg, c=c, a=a, denoise=denoise)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model (patches on it are honoured)."}),
                "seed": seed_input("Noise seed (same noise as KSampler for the same seed)."),
                "steps": steps_input("Denoising steps."),
                **_guidance_inputs(),
                **sampler_inputs(),
                "positive": ("CONDITIONING", {"tooltip": _CONDS_TOOLTIPS["positive"]}),
                "text_only": ("CONDITIONING", {"tooltip": _CONDS_TOOLTIPS["text_only"]}),
                "face_only": ("CONDITIONING", {"tooltip": _CONDS_TOOLTIPS["face_only"]}),
                "negative": ("CONDITIONING", {"tooltip": _CONDS_TOOLTIPS["negative"]}),
                "latent_image": ("LATENT", {"tooltip": "The latent to denoise (batch N for N faces)."}),
                "denoise": denoise_input("Fraction of the schedule to run (img2img below 1)."),
            },
        }

    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The denoised latent.",)
    FUNCTION = "sample"
    CATEGORY = CATEGORY
    DESCRIPTION = ("KSampler with Face0's three-way guidance. c = 1 gives KSampler's result at KSampler's cost; "
                   "c < 1 adds the text-only and/or face-only branches." + _GRAPH_RULE)

    def sample(self, model, seed, steps, cfg, c, a, sampler_name, scheduler, positive, text_only, face_only,
               negative, latent_image, denoise=1.0):
        guider = Guider_Face0ThreeWay(model)
        guider.set_cfg(cfg, c, a)
        guider.set_conds(positive, negative, text_only, face_only)
        latent = latent_image["samples"]
        latent = comfy.sample.fix_empty_latent_channels(model, latent)
        batch = latent.shape[0]
        for name, cond in (("positive", positive), ("face_only", face_only)):
            if any(t[0].shape[0] > batch for t in cond):
                log.warning("[facecond] ThreeWayCFGSampler: %s has a batch of %d but the latent only %d: the extra "
                            "faces are dropped. Set the latent batch_size to the number of faces.",
                            name, max(t[0].shape[0] for t in cond), batch)
        noise = comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index"))
        # the sigmas KSampler would use (scheduler, denoise, samplers that drop the penultimate sigma)
        sigmas = comfy.samplers.KSampler(model, steps=steps, device=model.load_device, sampler=sampler_name,
                                         scheduler=scheduler, denoise=denoise, model_options=model.model_options).sigmas
        callback = latent_preview.prepare_callback(model, sigmas.shape[-1] - 1)
        samples = guider.sample(noise, latent, comfy.samplers.sampler_object(sampler_name), sigmas,
                                denoise_mask=latent_image.get("noise_mask"), callback=callback,
                                disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
        out = latent_image.copy()
        out["samples"] = samples.to(comfy.model_management.intermediate_device())
        return (out,)


NODE_CLASS_MAPPINGS = {
    "FacecondThreeWayGuider": ThreeWayGuider,
    "FacecondThreeWayCFGSampler": ThreeWayCFGSampler,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FacecondThreeWayGuider": "ThreeWayGuider",
    "FacecondThreeWayCFGSampler": "ThreeWayCFGSampler",
}
