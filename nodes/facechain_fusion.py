"""FaceChain's face fusion (Liu et al., "FaceChain: A Playground for Human-centric Artificial Intelligence
Generated Content", arXiv 2308.14256) on ComfyUI sampling: re-diffuse each detected face of generated images
with the identity model and paste it back. The crop, mask and paste maths is ``py/facechain/fusion.py``; the
other FaceChain nodes are in ``facechain.py``.
"""

from __future__ import annotations

import logging

import comfy.model_management
import comfy.sample
import comfy.utils
import numpy as np
import torch

from ..py.facechain import fusion
from ..py.faces import align
from .common import (
    FACES,
    Progress,
    denoise_input,
    image_to_numpy,
    numpy_to_image,
    sampler_inputs,
    seed_input,
    steps_input,
)
from .facechain import CATEGORY, check_faces, real_face
from .paths import finite_floats

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
    DESCRIPTION = ("FaceChain-style face fusion on ComfyUI sampling: each detected face of the generated images is "
                   "cut out upright with context, upscaled to the working resolution, VAE-encoded, re-diffused with "
                   "the identity conditioning at the given denoise, decoded, shrunk and pasted back with a feathered "
                   "mask. Pixels outside the mask are left bit-identical; images without a face pass through.")
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
    def VALIDATE_INPUTS(cls, cfg=None, denoise=None, context=None, feather=None):  # NaN/inf, min/max of float widgets
        return finite_floats(cls, "FaceFusion", cfg=cfg, denoise=denoise, context=context, feather=feather)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model that carries the identity (face LoRA, IP-Adapter patch...)."}),
            "positive": ("CONDITIONING", {"tooltip": "Identity prompt, e.g. 'a close-up photo of sks man' or a "
                         "ProjectToContext positive."}),
            "negative": ("CONDITIONING", {"tooltip": "The negative prompt."}),
            "vae": ("VAE", {"tooltip": "Encodes and decodes the face crops."}),
            "images": ("IMAGE", {"tooltip": "The generated images (e.g. RankBySimilarity's top_k_images)."}),
            "faces": (FACES, {"tooltip": "FaceDetectCrop on the same 'images' (no_face='passthrough' or 'skip' "
                      "so faceless images do not stop the graph)."}),
            **_sampler_inputs(),
            "resolution": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 8, "tooltip":
                           "Working size of the face crop (512 for SD1.5, 1024 for SDXL)."}),
            "context": ("FLOAT", {"default": 1.6, "min": 1.0, "max": 4.0, "step": 0.05, "tooltip":
                        "Crop side in units of the aligned face region (1: the 112-px ArcFace crop area; more gives "
                        "the model hair and background to blend with)."}),
            "mask_shape": (MASK_SHAPES, {"default": "ellipse", "tooltip": "ellipse: a soft head ellipse from the "
                           "landmarks (no segmentation model). square: the whole crop with feathered edges."}),
            "feather": ("FLOAT", {"default": 0.15, "min": 0.0, "max": 0.5, "step": 0.01, "tooltip":
                        "Softness of the mask edge (fraction of the ellipse's short axis, or of the crop side)."}),
        }}

    def fuse(self, model, positive, negative, vae, images, faces, seed, steps, cfg, sampler_name, scheduler,
             denoise, resolution, context, mask_shape, feather):
        node = "FaceFusion"
        imgs = image_to_numpy(images, node, "images")
        faces = check_faces(node, faces, imgs, "images")
        if mask_shape not in MASK_SHAPES:
            raise ValueError(f"{node}: mask_shape {mask_shape!r}; choose one of {MASK_SHAPES}.")
        b, h, w = imgs.shape[:3]
        rows = [r for r in range(len(faces)) if real_face(faces, r)]
        out, alpha_all = imgs.copy(), np.zeros((b, h, w), np.float32)
        crop_mask = fusion.ellipse_mask(context, resolution, feather) if mask_shape == "ellipse" else \
            align.square_mask(resolution, feather)
        bar = Progress(len(rows) * steps)
        lines = []
        for done, r in enumerate(rows):
            i = faces.source_index[r]
            m = fusion.region_affine(faces.affine_arcface[r].numpy(), context, resolution)
            crop = fusion.cut(out[i], m, resolution)  # (S, S, 3): later faces see earlier fusions
            with torch.inference_mode():
                latent = vae.encode(numpy_to_image(crop[None]))
                latent = comfy.sample.fix_empty_latent_channels(model, latent)
                noise = comfy.sample.prepare_noise(latent, seed + done)
                callback = lambda step, x0, x, total, d=done: bar(d * steps + step + 1)  # noqa: E731
                samples = comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative,
                                              latent, denoise=denoise, callback=callback,
                                              disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed + done)
                new = vae.decode(samples.to(comfy.model_management.intermediate_device()))
            new = new.reshape(-1, *new.shape[-3:])[0, ..., :3].float().clamp(0, 1).cpu().numpy()
            if new.shape[:2] != (resolution, resolution):  # VAEs that change the size by a few pixels
                import cv2

                new = cv2.resize(new, (resolution, resolution), interpolation=cv2.INTER_AREA)
            out[i], alpha = align.paste_back(out[i], new, m, crop_mask)
            alpha_all[i] = np.maximum(alpha_all[i], alpha)
            lines.append(f"image {i}: face {r} fused (score {float(faces.scores[r]):.3f}, roll "
                         f"{fusion.roll_degrees(faces.affine_arcface[r].numpy()):+.0f} deg)")
        fused = {faces.source_index[r] for r in rows}
        passed = [i for i in range(b) if i not in fused]
        for i in passed:
            lines.append(f"image {i}: no face, passed through unchanged")
        if passed:
            log.info("[facecond] %s: no face in image(s) %s; passed through unchanged", node, passed)
        head = f"fused {len(rows)} face(s) in {b} image(s) at {resolution}px, denoise {denoise:g}"
        report = "\n".join([head, *lines])
        return (numpy_to_image(out), numpy_to_image(alpha_all), report)


NODE_CLASS_MAPPINGS = {"FacecondFaceFusion": FacecondFaceFusion}
NODE_DISPLAY_NAME_MAPPINGS = {"FacecondFaceFusion": "FaceFusion"}
