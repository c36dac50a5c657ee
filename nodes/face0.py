"""Face0 nodes (Valevski et al. 2023): load a projection, put a face into the text context, sample with the
three-way guidance. The maths lives in ``py/face0/projection.py`` and ``py/face0/guidance.py``; these classes
check inputs, call it and wrap results. The embedding nodes (interpolate, random identity, save/load) are in
``embeddings.py``.

Conventions (see ProjectToContext's DESCRIPTION):
- Face0's unconditional input is *empty text + zero face*, its text-only input *text + zero face*: the
  projection was trained with the projected tokens zeroed 10% of the time, so "no face" means zero tokens.
- The three-way guider combines ComfyUI's denoised (x0) predictions; the combination is affine with weights
  summing to 1, hence identical to combining ε (see py/face0/guidance.py).
"""

from __future__ import annotations

import logging

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import folder_paths
import latent_preview
import node_helpers
import torch

from ..py.face0.guidance import branch_weights, combine_conditional
from ..py.face0.projection import TOKENS_PER_CHUNK, face_tokens, load_projection, override_tokens
from .paths import finite_floats, load_file

log = logging.getLogger("facecond")

PROJECTION_FOLDER = "facecond_face0"  # models/facecond/face0, registered by nodes/model_paths.py
CATEGORY = "facecond/face0"
CHUNK_MODES = ["each", "first", "last"]


class LoadFace0Projection:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"projection_name": (folder_paths.get_filename_list(PROJECTION_FOLDER), {
            "tooltip": "Face0 projection (.safetensors) in models/facecond/face0. Its metadata says which face "
                       "embedder and which base model (context width) it was trained for."})}}

    RETURN_TYPES = ("FACE0_PROJECTION",)
    RETURN_NAMES = ("projection",)
    OUTPUT_TOOLTIPS = ("The Face0 projection MLP: face embedding -> K context tokens.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads a Face0 projection (4-layer MLP) from models/facecond/face0."

    def load(self, projection_name):
        proj = load_file("LoadFace0Projection", "projection_name", PROJECTION_FOLDER, projection_name, load_projection)
        log.info("[facecond] loaded Face0 projection %s (%s)", projection_name, proj.info)
        return (proj,)


def _check_embeds(node: str, face_embeds, proj) -> torch.Tensor:
    """The (N, D) float32 embeddings after the checks every Face0 node needs; ValueError naming the fix."""
    info = proj.info
    if len(face_embeds) == 0:
        raise ValueError(f"{node}: face_embeds is empty (0 embeddings). Check that FaceDetectCrop found a face "
                         "in every image, or use LoadFaceEmbeds / RandomIdentity.")
    x = face_embeds.embeds.float()
    if x.shape[1] != info.embed_dim:
        raise ValueError(f"{node}: face_embeds are {x.shape[1]}-d (from {face_embeds.model!r}) but the projection "
                         f"takes {info.embed_dim}-d embeddings from {info.embedder!r}. Embed the faces with the "
                         "model the projection was trained with, or load a projection trained for this embedder.")
    if info.embedder not in ("any", face_embeds.model):
        raise ValueError(f"{node}: face_embeds come from {face_embeds.model!r} but the projection was trained on "
                         f"{info.embedder!r}. Use that embedder, or a projection trained for {face_embeds.model!r}.")
    bad = (~torch.isfinite(x)).any(dim=1).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"{node}: face_embeds rows {bad} contain NaN or inf. Re-run FaceEmbed on those images, "
                         "or lower the noise / extrapolation of EmbeddingInterpolate.")
    return x


def _check_context(node: str, input_name: str, conditioning, proj) -> None:
    info = proj.info
    if not conditioning:
        raise ValueError(f"{node}: {input_name} is an empty conditioning list. Connect a CLIPTextEncode output.")
    for ctx, _ in conditioning:
        if ctx.ndim != 3 or ctx.shape[-1] != info.context_dim:
            raise ValueError(
                f"{node}: {input_name} has context width {ctx.shape[-1] if ctx.ndim == 3 else tuple(ctx.shape)} but "
                f"the projection makes {info.context_dim}-wide tokens (base model {info.base_model!r}). Load a "
                "projection trained for this checkpoint's family (768: SD1.x, 1024: SD2.x, 2048: SDXL).")
        if ctx.shape[1] % TOKENS_PER_CHUNK:
            raise ValueError(f"{node}: {input_name} has {ctx.shape[1]} tokens, not a multiple of "
                             f"{TOKENS_PER_CHUNK}; Face0 needs a CLIP text context (SD1.x, SD2.x, SDXL).")


def apply_face_tokens(conditioning, tokens: torch.Tensor | None, k: int, chunks: str, node: str):
    """A copy of ``conditioning`` whose context ends (per ``chunks``) with ``tokens`` (N, K, W), or zeros if None.

    Batch rule per entry of batch B: B == N pairs row i with embedding i; B == 1 repeats the prompt for the
    N faces; N == 1 puts the one face into every row; anything else is an error. Other keys (pooled_output,
    masks, areas, hooks) are kept as they are; a batch-1 pooled output is broadcast by ComfyUI.
    """
    out = []
    for ctx, opts in conditioning:
        b, _, width = ctx.shape
        if tokens is None:
            tok, base = torch.zeros(b, k, width), ctx
        else:
            n = tokens.shape[0]
            if b == n:
                tok, base = tokens, ctx
            elif b == 1:
                tok, base = tokens, ctx.expand(n, -1, -1)
            elif n == 1:
                tok, base = tokens.expand(b, -1, -1), ctx
            else:
                raise ValueError(f"{node}: {n} face embeddings for a conditioning batch of {b}. Give one face, "
                                 f"one prompt, or as many faces as prompts.")
        out.append([override_tokens(base, tok, chunks), opts.copy()])
    return out


class ProjectToContext:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "conditioning": ("CONDITIONING", {"tooltip": "The text prompt (CLIPTextEncode). Its last K tokens "
                                                  "are replaced by the projected face."}),
                "face_embeds": ("FACE_EMBEDS", {"tooltip": "N face embeddings: N embeddings and a "
                                                "one-prompt conditioning give a conditioning batch of N (use a latent "
                                                "batch of N)."}),
                "projection": ("FACE0_PROJECTION", {"tooltip": "From LoadFace0Projection."}),
                "clip": ("CLIP", {"tooltip": "Encodes the empty prompt for face_only and negative (Face0's "
                                  "unconditional input is empty text + zero face)."}),
                "chunks": (CHUNK_MODES, {"default": "each", "tooltip": "Prompts over 75 tokens are several 77-token "
                           "chunks. each: the face ends every chunk (each chunk looks like a training context and "
                           "the face keeps its share of attention); first / last: only that chunk."}),
            },
            "optional": {
                "empty_conditioning": ("CONDITIONING", {"tooltip": "Optional: use this instead of encoding \"\" "
                                       "with clip (e.g. an SDXL encode with size settings)."}),
            },
        }

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "text_only", "face_only", "negative")
    OUTPUT_TOOLTIPS = ("text + face: ε(d, f)", "text + zero face: ε(d)", "empty text + face: ε(f)",
                       "empty text + zero face: the unconditional ε(∅)")
    FUNCTION = "project"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Face0: overrides the last K (=3) tokens of each 77-token chunk of the text context with the projected "
        "face embedding. A zero embedding (or the text_only / negative outputs) gives zero tokens, the training-"
        "time 'no face' input. SDXL: needs a 2048-wide projection; the pooled output is left alone. Never edits "
        "its inputs.")

    def project(self, conditioning, face_embeds, projection, clip, chunks, empty_conditioning=None):
        node = "ProjectToContext"
        x = _check_embeds(node, face_embeds, projection)
        if empty_conditioning is None:
            if clip is None:
                raise ValueError(f"{node}: clip is None (the checkpoint has no text encoder); connect "
                                 "empty_conditioning instead.")
            empty_conditioning = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        _check_context(node, "conditioning", conditioning, projection)
        _check_context(node, "empty_conditioning", empty_conditioning, projection)
        with torch.inference_mode():
            tokens = face_tokens(projection, x)  # (N, K, W); zero rows → zero tokens
        k = projection.info.tokens
        positive = apply_face_tokens(conditioning, tokens, k, chunks, node)
        text_only = apply_face_tokens(conditioning, None, k, chunks, node)
        face_only = apply_face_tokens(empty_conditioning, tokens, k, chunks, node)
        negative = apply_face_tokens(empty_conditioning, None, k, chunks, node)
        return (positive, text_only, face_only, negative)


class Guider_Face0ThreeWay(comfy.samplers.CFGGuider):
    """Face0's three-way guidance (py/face0/guidance.py) as a ComfyUI guider.

    Every branch with a non-zero weight is evaluated in one ``calc_cond_batch`` call, in the order
    [positive (d,f), negative (∅), text_only (d), face_only (f)] so that hooks reading ``conds_out[0]``/``[1]``
    see cond/uncond as under plain CFG; the combined ε̃ then goes through ComfyUI's own ``cfg_function``
    (so ``sampler_cfg_function`` patches and post-CFG hooks run as under KSampler). Pre-CFG hooks are run
    here, as Guider_PerpNeg does, because ``sampling_function`` is skipped.
    """

    def __init__(self, model_patcher):
        super().__init__(model_patcher)
        self.set_cfg(self.cfg)  # plain CFG until set_cfg says otherwise

    def set_conds(self, positive, negative, text_only=None, face_only=None):
        conds = {"positive": positive, "negative": negative}
        need = self.weights.needed(skip_uncond_at_cfg1=False)
        # Only the branches that can run are registered, so c = 1 prepares exactly what KSampler prepares.
        for key, cond, weight in (("text_only", text_only, "text"), ("face_only", face_only, "face")):
            if need[weight]:
                if cond is None:
                    raise ValueError(f"ThreeWayCFG: c={self.c:g}, a={self.a:g} give the {key} branch weight "
                                     f"{getattr(self.weights, weight):g}; connect ProjectToContext's {key} output.")
                conds[key] = node_helpers.conditioning_set_values(cond, {"prompt_type": "positive"})
        self.inner_set_conds(conds)

    def set_cfg(self, cfg, c=1.0, a=0.0):
        self.cfg, self.c, self.a = cfg, c, a
        self.weights = branch_weights(cfg, c, a)

    def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006 (ComfyUI's signature)
        need = self.weights.needed(skip_uncond_at_cfg1=not model_options.get("disable_cfg1_optimization", False))
        positive = self.conds.get("positive")
        conds = [positive if need["text_face"] else None, self.conds.get("negative") if need["uncond"] else None,
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
        for fn in model_options.get("sampler_pre_cfg_function", []):
            args = {"conds": conds, "conds_out": out, "cond_scale": self.cfg, "timestep": timestep,
                    "input": x, "sigma": timestep, "model": self.inner_model, "model_options": model_options}
            out = fn(args)
        out = list(out) + [None] * (4 - len(out))
        preds = [o if cnd is not None else None for o, cnd in zip(out, [*conds, None, None])]
        cond_pred = combine_conditional(self.weights, preds[0], preds[2], preds[3])
        return comfy.samplers.cfg_function(self.inner_model, cond_pred, out[1], self.cfg, x, timestep,
                                           model_options=model_options, cond=positive, uncond=conds[1])


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
    "positive": "text + face (ProjectToContext positive).",
    "negative": "empty text + zero face (ProjectToContext negative): the unconditional.",
    "text_only": "text + zero face (ProjectToContext text_only); needed when (1-c)(1-a) != 0.",
    "face_only": "empty text + face (ProjectToContext face_only); needed when (1-c)a != 0.",
}


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
                   "e^ = w·e~ + (1-w)·e(0). Zero-weight branches are not evaluated.")

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
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "control_after_generate": True,
                                 "tooltip": "Noise seed (same noise as KSampler for the same seed)."}),
                "steps": ("INT", {"default": 20, "min": 1, "max": 10000, "tooltip": "Denoising steps."}),
                **_guidance_inputs(),
                "sampler_name": (comfy.samplers.KSampler.SAMPLERS, {"tooltip": "The sampling algorithm."}),
                "scheduler": (comfy.samplers.KSampler.SCHEDULERS, {"tooltip": "The noise schedule."}),
                "positive": ("CONDITIONING", {"tooltip": _CONDS_TOOLTIPS["positive"]}),
                "text_only": ("CONDITIONING", {"tooltip": _CONDS_TOOLTIPS["text_only"]}),
                "face_only": ("CONDITIONING", {"tooltip": _CONDS_TOOLTIPS["face_only"]}),
                "negative": ("CONDITIONING", {"tooltip": _CONDS_TOOLTIPS["negative"]}),
                "latent_image": ("LATENT", {"tooltip": "The latent to denoise (batch N for N faces)."}),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                      "tooltip": "Fraction of the schedule to run (img2img below 1)."}),
            },
        }

    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The denoised latent.",)
    FUNCTION = "sample"
    CATEGORY = CATEGORY
    DESCRIPTION = ("KSampler with Face0's three-way guidance. c = 1 gives KSampler's result at KSampler's cost; "
                   "c < 1 adds the text-only and/or face-only branches.")

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
    "FacecondLoadFace0Projection": LoadFace0Projection,
    "FacecondProjectToContext": ProjectToContext,
    "FacecondThreeWayGuider": ThreeWayGuider,
    "FacecondThreeWayCFGSampler": ThreeWayCFGSampler,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FacecondLoadFace0Projection": "LoadFace0Projection",
    "FacecondProjectToContext": "ProjectToContext",
    "FacecondThreeWayGuider": "ThreeWayGuider",
    "FacecondThreeWayCFGSampler": "ThreeWayCFGSampler",
}
