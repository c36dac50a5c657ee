"""FaceChain's face fusion (Liu et al., "FaceChain: A Playground for Human-centric Artificial Intelligence
Generated Content", arXiv 2308.14256) on ComfyUI sampling: re-diffuse each detected face of generated images
with the identity model and paste it back. The crop, mask and paste maths is ``py/facechain/fusion.py``; the
other FaceChain nodes are in ``chain.py`` and ``tagging.py``.
"""

from __future__ import annotations

import logging

import comfy.model_management
import comfy.sample
import comfy.utils
import numpy as np
import torch

from ...py.facechain import fusion, swap
from ...py.faces import align
from .. import model_cache
from ..common import (
    FACE_EMBEDS,
    FACES,
    Progress,
    denoise_input,
    image_to_numpy,
    numpy_to_image,
    require_embeds,
    require_faces,
    sampler_inputs,
    seed_input,
    steps_input,
)
from ..faces.detect_embed import insightface_roots
from ..model_family import NATIVE_TOOLTIP, resolve_resolution
from ..paths import finite_floats
from .chain import CATEGORY, check_faces, real_face

log = logging.getLogger("facecond")

MASK_SHAPES = ["ellipse", "square"]


def _sampler_inputs():
    return {
        "seed": seed_input("Noise seed; face f of the batch uses seed + f."),
        "steps": steps_input("Sampling steps of the full schedule (denoise runs the last part of it)."),
        "cfg": ("FLOAT", {"default": 7.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                          "tooltip": "Classifier-free guidance scale."}),
        **sampler_inputs(),
        "denoise": denoise_input("How much of the face is redrawn: 0 keeps it, 0.3-0.5 moves it towards the "
                                 "identity while keeping pose and light, 1 redraws it from noise.", default=0.4),
    }


class FacecondFaceFusion:
    DESCRIPTION = ("FaceChain-style face fusion of each generated face with the template face: optionally an "
                   "insightface-format swap model (inswapper) puts the template's identity in first; the face is "
                   "cut out upright with context at the working resolution, the template's face (warped onto its "
                   "landmarks, colour-matched) is blended in with template_strength, and the crop is re-diffused "
                   "with the identity conditioning at the given denoise and pasted back with a feathered mask. "
                   "Pixels outside the mask are left bit-identical; images without a face pass through.")
    CATEGORY = CATEGORY
    FUNCTION = "fuse"
    RETURN_TYPES = ("IMAGE", "MASK", "STRING")
    RETURN_NAMES = ("images", "mask", "report")
    OUTPUT_TOOLTIPS = (
        "The images with their faces re-diffused (unchanged where no face was found).",
        "The paste-back alpha per image (0: pixel untouched).",
        "Which faces were fused and which images passed through.",
    )

    @classmethod
    def VALIDATE_INPUTS(cls, cfg=None, denoise=None, context=None, feather=None, template_strength=None):
        return finite_floats(cls, "FaceFusion", cfg=cfg, denoise=denoise, context=context, feather=feather,
                             template_strength=template_strength)  # NaN/inf, min/max of float widgets

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model that carries the identity (face LoRA, IP-Adapter patch on the "
                      "template...)."}),
            "positive": ("CONDITIONING", {"tooltip": "Identity prompt, e.g. 'a close-up photo of sks man' or a "
                         "ProjectToContext positive of the template's embedding."}),
            "negative": ("CONDITIONING", {"tooltip": "The negative prompt."}),
            "vae": ("VAE", {"tooltip": "Encodes and decodes the face crops."}),
            "images": ("IMAGE", {"tooltip": "The generated images (all of them: rank after fusing)."}),
            "faces": (FACES, {"tooltip": "FaceDetectCrop on the same 'images' (no_face='passthrough' or 'skip' "
                      "so faceless images do not stop the graph)."}),
            **_sampler_inputs(),
            "resolution": ("INT", {"default": 0, "min": 0, "max": 2048, "step": 8, "tooltip":
                           "Working size of the face crop. " + NATIVE_TOOLTIP}),
            "context": ("FLOAT", {"default": 1.6, "min": 1.0, "max": 4.0, "step": 0.05, "tooltip":
                        "Crop side in units of the aligned face region (1: the 112-px ArcFace crop area; more gives "
                        "the model hair and background to blend with)."}),
            "mask_shape": (MASK_SHAPES, {"default": "ellipse", "tooltip": "ellipse: a soft head ellipse from the "
                           "landmarks (no segmentation model). square: the whole crop with feathered edges."}),
            "feather": ("FLOAT", {"default": 0.15, "min": 0.0, "max": 0.5, "step": 0.01, "tooltip":
                        "Softness of the mask edge (fraction of the ellipse's short axis, or of the crop side)."}),
        }, "optional": {
            "template": (FACES, {"tooltip": "The template face (ChooseTemplateFace's template_face; with several "
                         "faces the first detected one). It is warped onto each generated face's landmarks and "
                         "blended into the re-diffusion's start image (template_strength)."}),
            "template_image": ("IMAGE", {"tooltip": "The photo 'template' was found in (ChooseTemplateFace's "
                               "template_image): the template is cut from it at the working resolution. Without "
                               "it, the 112-px aligned crop held in 'template' is used (blurrier, face only)."}),
            "template_embeds": (FACE_EMBEDS, {"tooltip": "The template's identity for swap_model: FaceEmbed of the "
                                "template with the recogniser the swap model was trained on (inswapper_128: "
                                "buffalo_l/w600k_r50.onnx, 512-d). Used only with a swap model."}),
            "template_strength": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip":
                                  "How much of the template's face goes into the start image inside the head "
                                  "mask (0: none, the re-diffusion alone; 1: the template's face, colour-matched "
                                  "to the generated image). Needs 'template'."}),
            "swap_model": (_swap_choices(), {"default": "none", "tooltip": "An insightface-format face swap model "
                           "(inswapper_128.onnx in models/insightface/) run on each face before the re-diffusion, "
                           "with template_embeds as the identity. none: no swap."}),
        }}

    def fuse(self, model, positive, negative, vae, images, faces, seed, steps, cfg, sampler_name, scheduler,
             denoise, resolution, context, mask_shape, feather, template=None, template_image=None,
             template_embeds=None, template_strength=0.5, swap_model="none"):
        node = "FaceFusion"
        resolution = resolve_resolution(resolution, model, node)
        imgs = image_to_numpy(images, node, "images")
        faces = check_faces(node, faces, imgs, "images")
        if mask_shape not in MASK_SHAPES:
            raise ValueError(f"{node}: mask_shape {mask_shape!r}; choose one of {MASK_SHAPES}.")
        b, h, w = imgs.shape[:3]
        rows = [r for r in range(len(faces)) if real_face(faces, r)]
        out, alpha_all = imgs.copy(), np.zeros((b, h, w), np.float32)
        crop_mask = fusion.ellipse_mask(context, resolution, feather) if mask_shape == "ellipse" else \
            align.square_mask(resolution, feather)
        tmpl = _template(node, template, template_image, context, resolution)
        use_tmpl = tmpl is not None and template_strength > 0
        tmpl_weight = None
        if use_tmpl:  # the template goes in over the face (head ellipse), whatever the paste mask
            head = crop_mask if mask_shape == "ellipse" else fusion.ellipse_mask(context, resolution, feather)
            tmpl_weight = head * tmpl[1]
        swapper, latent = _swapper(node, swap_model, template_embeds)
        smask = swap.swap_mask(feather) if swapper is not None else None
        diffuse = denoise > 0
        bar = Progress(max(len(rows) * steps, 1))
        lines = []
        for done, r in enumerate(rows):
            i = faces.source_index[r]
            affine = faces.affine_arcface[r].numpy()
            did = []
            if swapper is not None:
                out[i], a_swap, _ = swap.swap_face(out[i], affine, swapper, latent, smask)
                alpha_all[i] = np.maximum(alpha_all[i], a_swap)
                did.append("swapped")
            m = fusion.region_affine(affine, context, resolution)
            crop = fusion.cut(out[i], m, resolution)  # (S, S, 3): later faces see earlier fusions
            if use_tmpl:
                face_t = fusion.match_colour(tmpl[0], crop, tmpl_weight)
                crop = fusion.blend_template(crop, face_t, template_strength * tmpl_weight)
                did.append(f"template {template_strength:g}")
            if diffuse:
                crop = self._rediffuse(model, positive, negative, vae, crop, seed + done, steps, cfg, sampler_name,
                                       scheduler, denoise, resolution, bar, done)
                did.append("re-diffused")
            if use_tmpl or diffuse:
                out[i], alpha = align.paste_back(out[i], crop, m, crop_mask)
                alpha_all[i] = np.maximum(alpha_all[i], alpha)
            lines.append(f"image {i}: face {r} fused ({', '.join(did) or 'unchanged: denoise 0, no template'}; "
                         f"score {float(faces.scores[r]):.3f}, roll "
                         f"{fusion.roll_degrees(affine):+.0f} deg)")
        fused = {faces.source_index[r] for r in rows}
        passed = [i for i in range(b) if i not in fused]
        for i in passed:
            lines.append(f"image {i}: no face, passed through unchanged")
        if passed:
            log.info("[facecond] %s: no face in image(s) %s; passed through unchanged", node, passed)
        head_line = f"fused {len(rows)} face(s) in {b} image(s) at {resolution}px, denoise {denoise:g}"
        if tmpl is not None:
            head_line += f", template strength {template_strength:g}"
        if swapper is not None:
            head_line += f", swap {swap_model}"
        report = "\n".join([head_line, *lines])
        return (numpy_to_image(out), numpy_to_image(alpha_all), report)

    @staticmethod
    def _rediffuse(model, positive, negative, vae, crop, seed, steps, cfg, sampler_name, scheduler, denoise,
                   resolution, bar, done):
        """The crop VAE-encoded, re-noised to ``denoise`` and sampled (SDEdit, Meng et al. 2022), decoded."""
        with torch.inference_mode():
            latent = vae.encode(numpy_to_image(crop[None]))
            latent = comfy.sample.fix_empty_latent_channels(model, latent)
            noise = comfy.sample.prepare_noise(latent, seed)
            callback = lambda step, x0, x, total: bar(done * steps + step + 1)  # noqa: E731
            samples = comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative,
                                          latent, denoise=denoise, callback=callback,
                                          disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
            new = vae.decode(samples.to(comfy.model_management.intermediate_device()))
        new = new.reshape(-1, *new.shape[-3:])[0, ..., :3].float().clamp(0, 1).cpu().numpy()
        if new.shape[:2] != (resolution, resolution):  # VAEs that change the size by a few pixels
            import cv2

            new = cv2.resize(new, (resolution, resolution), interpolation=cv2.INTER_AREA)
        return new


def _swap_choices() -> list[str]:
    try:
        return ["none", *swap.list_swappers(insightface_roots())]
    except (OSError, ValueError) as e:  # a broken folder must not hide the node
        log.warning("[facecond] FaceFusion: could not list swap models: %s", e)
        return ["none"]


def _template(node: str, template, template_image, context: float, size: int):
    """(pixels, validity) of the template face in working-crop coordinates, or None without a template."""
    if template is None:
        if template_image is not None:
            raise ValueError(f"{node}: 'template_image' is connected but 'template' is not. Connect "
                             "ChooseTemplateFace's template_face to 'template' (it says where the face is).")
        return None
    require_faces(node, "template", template)
    rows = [r for r in range(len(template)) if real_face(template, r)]
    if not rows:
        raise ValueError(f"{node}: 'template' holds no detected face. Connect ChooseTemplateFace's template_face, "
                         "or FaceDetectCrop on a photo where it finds the face.")
    r = rows[0]
    if template_image is None:
        return fusion.template_from_aligned(template.crops_arcface[r].numpy(), context, size)
    timgs = image_to_numpy(template_image, node, "template_image")
    if template.num_images != timgs.shape[0] or tuple(template.image_size) != timgs.shape[1:3]:
        raise ValueError(f"{node}: 'template' was found in {template.num_images} image(s) of "
                         f"{template.image_size[0]}x{template.image_size[1]} but 'template_image' is "
                         f"{timgs.shape[0]} image(s) of {timgs.shape[1]}x{timgs.shape[2]}. Connect "
                         "ChooseTemplateFace's template_face and template_image together.")
    return fusion.template_region(timgs[template.source_index[r]], template.affine_arcface[r].numpy(), context, size)


def _swapper(node: str, swap_model: str, template_embeds):
    """(Swapper, (1, D) latent) for the chosen swap model, or (None, None)."""
    if swap_model in (None, "none"):
        return None, None
    if template_embeds is None:
        raise ValueError(f"{node}: swap_model {swap_model!r} needs 'template_embeds' (FaceEmbed of the template "
                         "with an ArcFace recogniser, e.g. buffalo_l/w600k_r50.onnx). Connect it, or set "
                         "swap_model to none.")
    try:
        path = swap.resolve_swapper(insightface_roots(), swap_model)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{node}: {e}") from None
    swapper = model_cache.load("onnx-swapper", path, lambda p: swap.Swapper(p, model_cache.onnx_session(p)),
                               lambda s: s.session)
    model_cache.to_device(swapper.session)
    emb = require_embeds(node, "template_embeds", template_embeds, dim=swapper.embed_dim,
                         against=f"{swap_model} (emap {swapper.emap.shape[0]}x{swapper.emap.shape[1]}) takes",
                         fix="inswapper_128 takes buffalo_l/w600k_r50.onnx embeddings")
    if not template_embeds.model.startswith("insightface/"):
        log.warning("[facecond] %s: template_embeds come from %s; %s expects ArcFace (insightface) embeddings",
                    node, template_embeds.model, swap_model)
    return swapper, swap.swap_latent(emb[0].numpy(), swapper.emap)


NODE_CLASS_MAPPINGS = {"FacecondFaceFusion": FacecondFaceFusion}
NODE_DISPLAY_NAME_MAPPINGS = {"FacecondFaceFusion": "FaceFusion"}
