"""FaceChain's finishing chain (Liu et al., "FaceChain: A Playground for Human-centric Artificial Intelligence
Generated Content", arXiv 2308.14256): preprocessing of the user's photos for a face-LoRA, template-face
choice by face quality, face fusion of generated images, and similarity ranking against the template.

Thin ComfyUI wrappers over ``py/facechain/`` (``quality``, ``ranking``, ``fusion``); faces come from
FaceDetectCrop (FACES), embeddings from FaceEmbed (FACE_EMBEDS). The LoRAs themselves are ComfyUI's own
(LoraLoader; TrainLoraNode in comfy_extras/nodes_train.py).
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import numpy as np
import torch

from ..py.facechain import fusion, ranking
from ..py.facechain import quality as face_quality
from ..py.faces import align
from ..py.faces.types import FaceEmbeds, Faces
from .faces import image_to_numpy
from .paths import finite_floats

log = logging.getLogger("facecond")

CATEGORY = "facecond/facechain"
MASK_SHAPES = ["ellipse", "square"]


def _check_faces(node: str, faces, imgs: np.ndarray, image_name: str = "image") -> Faces:
    if not isinstance(faces, Faces):
        raise ValueError(f"{node}: input 'faces' must come from FaceDetectCrop (got {type(faces).__name__}).")
    b, h, w = imgs.shape[:3]
    if faces.num_images != b or tuple(faces.image_size) != (h, w):
        raise ValueError(f"{node}: 'faces' were found in {faces.num_images} image(s) of {faces.image_size[0]}x"
                         f"{faces.image_size[1]} but '{image_name}' is {b} image(s) of {h}x{w}. Connect the same "
                         f"IMAGE to FaceDetectCrop and to this node's '{image_name}'.")
    return faces


def _real(faces: Faces, row: int) -> bool:
    """False for FaceDetectCrop's no_face='passthrough' stand-ins (score 0)."""
    return float(faces.scores[row]) > 0.0


class FacecondChooseTemplateFace:
    DESCRIPTION = ("FaceChain's template face: among the faces of the user's photos, the one with the best face-"
                   "quality score Q = visibility x (0.15 confidence + 0.15 size + 0.35 frontality + 0.35 "
                   "sharpness) (formula in py/facechain/quality.py). Outputs that face, its photo, its aligned crop "
                   "and every face's score.")
    CATEGORY = CATEGORY
    FUNCTION = "choose"
    RETURN_TYPES = ("FACES", "IMAGE", "IMAGE", "STRING", "INT")
    RETURN_NAMES = ("template_face", "template_image", "template_crop", "report", "image_index")
    OUTPUT_TOOLTIPS = (
        "The chosen face alone (as FACES of the one template image: source index 0).",
        "The photo the template face is in (1, H, W, 3).",
        "Its 112x112 five-point aligned crop.",
        "Every face's quality score and terms, best first.",
        "Index of the template photo in the input batch.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "faces": ("FACES", {"tooltip": "Faces of the user's photos (FaceDetectCrop, select=largest or all)."}),
            "image": ("IMAGE", {"tooltip": "The same photos that went into FaceDetectCrop."}),
        }}

    def choose(self, faces, image):
        node = "ChooseTemplateFace"
        imgs = image_to_numpy(image, node)
        faces = _check_faces(node, faces, imgs)
        rows = [r for r in range(len(faces)) if _real(faces, r)]
        if not rows:
            raise ValueError(f"{node}: 'faces' holds no detected face (only passthrough stand-ins or none). Give "
                             "photos where FaceDetectCrop finds a face, or lower its min_size.")
        h, w = faces.image_size
        qs = [face_quality.face_quality(float(faces.scores[r]), faces.boxes[r].numpy(), faces.landmarks[r].numpy(),
                                        faces.crops_arcface[r].numpy(), (h, w)) for r in rows]
        order = face_quality.rank_faces(qs)
        best = rows[order[0]]
        src = faces.source_index[best]
        lines = [f"template: face {best} (image {src})"]
        lines += [f"face {rows[i]} (image {faces.source_index[rows[i]]}): {qs[i].describe()}" for i in order]
        report = "\n".join(lines)
        log.info("[facecond] %s: %s", node, lines[0])
        template = replace(faces.select([best]), source_index=(0,), num_images=1, skipped=())
        photo = torch.from_numpy(imgs[src:src + 1].copy())
        return (template, photo, faces.crops_arcface[best:best + 1].clone(), report, int(src))


class FacecondRankBySimilarity:
    DESCRIPTION = ("FaceChain's similarity ranking: the cosine of each generated image's face embedding with the "
                   "template's (optionally softmax(cos/T) as scores), the batch sorted best first and its top k. "
                   "Images without a face go last with score -1; never an error.")
    CATEGORY = CATEGORY
    FUNCTION = "rank"
    RETURN_TYPES = ("IMAGE", "IMAGE", "FLOAT", "STRING", "INT")
    RETURN_NAMES = ("sorted_images", "top_k_images", "scores", "report", "order")
    OUTPUT_IS_LIST = (False, False, True, False, True)
    OUTPUT_TOOLTIPS = (
        "The input batch, most similar first (images without a face at the end).",
        "The first top_k images of sorted_images.",
        "Scores in sorted order (a list): cosine, or softmax share with temperature > 0; -1 without a face.",
        "One line per image: rank, input index, cosine, score.",
        "Input indices in sorted order (a list).",
    )

    @classmethod
    def VALIDATE_INPUTS(cls, temperature=None):  # NaN/inf, min/max of float widgets
        return finite_floats(cls, "RankBySimilarity", temperature=temperature)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "images": ("IMAGE", {"tooltip": "The generated batch to rank."}),
            "face_embeds": ("FACE_EMBEDS", {"tooltip": "FaceEmbed of FaceDetectCrop on 'images' (any no_face "
                            "policy: images without a row, or with a passthrough row when 'faces' is given, "
                            "count as faceless)."}),
            "template_embeds": ("FACE_EMBEDS", {"tooltip": "FaceEmbed of the template face (same model). Several "
                                "rows: their mean direction is the template."}),
            "top_k": ("INT", {"default": 2, "min": 1, "max": 4096, "tooltip":
                      "How many of the best images top_k_images holds (fewer if the batch is smaller)."}),
            "temperature": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 10.0, "step": 0.01, "tooltip":
                            "0: scores are the cosine. > 0: softmax(cosine / T) over the images with a face "
                            "(FaceChain's temperature scaling; 0.1 is sharp, 1 flat). The order is the same."}),
        }, "optional": {
            "faces": ("FACES", {"tooltip": "FaceDetectCrop's faces of 'images' (optional): its no_face='passthrough' "
                      "stand-ins (score 0) are then treated as no face instead of being ranked."}),
        }}

    def rank(self, images, face_embeds, template_embeds, top_k, temperature, faces=None):
        node = "RankBySimilarity"
        imgs = image_to_numpy(images, node, "images")
        n = imgs.shape[0]
        for name, fe in (("face_embeds", face_embeds), ("template_embeds", template_embeds)):
            if not isinstance(fe, FaceEmbeds):
                raise ValueError(f"{node}: input '{name}' must be a FACE_EMBEDS from FaceEmbed "
                                 f"(got {type(fe).__name__}).")
        if len(template_embeds) == 0:
            raise ValueError(f"{node}: 'template_embeds' is empty; embed the template face with FaceEmbed.")
        if len(face_embeds) and (face_embeds.model != template_embeds.model or face_embeds.dim != template_embeds.dim):
            raise ValueError(f"{node}: face_embeds come from {face_embeds.model!r} ({face_embeds.dim}-d) and "
                             f"template_embeds from {template_embeds.model!r} ({template_embeds.dim}-d). Embed both "
                             "with the same FaceEmbed model.")
        valid = None
        if faces is not None:
            faces = _check_faces(node, faces, imgs, "images")
            if tuple(faces.source_index) != tuple(face_embeds.source_index):
                raise ValueError(f"{node}: 'faces' and 'face_embeds' list different faces; connect the FACES that "
                                 "went into the FaceEmbed of face_embeds.")
            valid = [_real(faces, r) for r in range(len(faces))]
        if len(face_embeds):
            cos = ranking.image_cosines(face_embeds.embeds, face_embeds.source_index, template_embeds.embeds, n, valid)
        else:
            cos = [float("nan")] * n
        res = ranking.rank(cos, temperature)
        order = res.order
        k = min(top_k, n)
        lines = [f"ranked {n} image(s) against the template ({template_embeds.model}), temperature {temperature:g}"]
        for pos, i in enumerate(order):
            c = res.cosine[i]
            lines.append(f"#{pos + 1}: image {i} " + ("no face (score -1)" if math.isnan(c)
                                                        else f"cosine {c:+.4f} score {res.scores[i]:.4f}"))
        missing = [i for i in range(n) if math.isnan(res.cosine[i])]
        if missing:
            log.info("[facecond] %s: no face in image(s) %s; ranked last with score -1", node, missing)
        idx = torch.as_tensor(order, dtype=torch.long)
        sorted_images = images[idx].clone() if images.ndim == 4 else images.unsqueeze(0)[idx].clone()
        return (sorted_images, sorted_images[:k].clone(), [float(res.scores[i]) for i in order], "\n".join(lines),
                [int(i) for i in order])


def _sampler_inputs():
    return {
        "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "control_after_generate": True,
                         "tooltip": "Noise seed; face f of the batch uses seed + f."}),
        "steps": ("INT", {"default": 20, "min": 1, "max": 10000, "tooltip": "Sampling steps of the full schedule "
                          "(denoise runs the last part of it)."}),
        "cfg": ("FLOAT", {"default": 7.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                          "tooltip": "Classifier-free guidance scale."}),
        "sampler_name": (comfy.samplers.KSampler.SAMPLERS, {"tooltip": "The sampling algorithm."}),
        "scheduler": (comfy.samplers.KSampler.SCHEDULERS, {"tooltip": "The noise schedule."}),
        "denoise": ("FLOAT", {"default": 0.4, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                    "How much of the face is redrawn: 0 keeps it, 0.3-0.5 moves it towards the identity while "
                    "keeping pose and light, 1 redraws it from noise."}),
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
            "faces": ("FACES", {"tooltip": "FaceDetectCrop on the same 'images' (no_face='passthrough' or 'skip' "
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
        faces = _check_faces(node, faces, imgs, "images")
        if mask_shape not in MASK_SHAPES:
            raise ValueError(f"{node}: mask_shape {mask_shape!r}; choose one of {MASK_SHAPES}.")
        b, h, w = imgs.shape[:3]
        rows = [r for r in range(len(faces)) if _real(faces, r)]
        out, alpha_all = imgs.copy(), np.zeros((b, h, w), np.float32)
        crop_mask = fusion.ellipse_mask(context, resolution, feather) if mask_shape == "ellipse" else \
            align.square_mask(resolution, feather)
        pbar = comfy.utils.ProgressBar(max(1, len(rows) * steps))
        lines = []
        for done, r in enumerate(rows):
            i = faces.source_index[r]
            m = fusion.region_affine(faces.affine_arcface[r].numpy(), context, resolution)
            crop = fusion.cut(out[i], m, resolution)  # (S, S, 3): later faces see earlier fusions
            with torch.inference_mode():
                latent = vae.encode(torch.from_numpy(crop)[None])
                latent = comfy.sample.fix_empty_latent_channels(model, latent)
                noise = comfy.sample.prepare_noise(latent, seed + done)
                callback = lambda step, x0, x, total, d=done: pbar.update_absolute(d * steps + step + 1)  # noqa: E731
                samples = comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative,
                                              latent, denoise=denoise, callback=callback,
                                              disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed + done)
                new = vae.decode(samples.to(comfy.model_management.intermediate_device()))
            new = new.reshape(-1, *new.shape[-3:])[0, ..., :3].float().clamp(0, 1).cpu().numpy()
            if new.shape[:2] != (resolution, resolution):  # VAEs that change the size by a few pixels
                import cv2

                new = cv2.resize(new, (resolution, resolution), interpolation=cv2.INTER_AREA)
            out[i], alpha = fusion.paste(out[i], new, m, crop_mask)
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
        return (torch.from_numpy(out), torch.from_numpy(alpha_all), report)


class FacecondFaceChainPreprocess:
    DESCRIPTION = ("FaceChain's input processing for face-LoRA training: each photo's face is turned upright (by "
                   "its landmarks; FaceDetectCrop's upright correction finds sideways faces), centred and cropped "
                   "square at the training resolution. Optional soft head-ellipse mask (no segmentation model here; "
                   "FaceChain uses human parsing) and background fill. Photos without a face are dropped.")
    CATEGORY = CATEGORY
    FUNCTION = "prepare"
    RETURN_TYPES = ("IMAGE", "MASK", "STRING")
    RETURN_NAMES = ("images", "mask", "report")
    OUTPUT_TOOLTIPS = (
        "One upright, centred face crop per detected face (N, resolution, resolution, 3), for VAEEncode -> "
        "TrainLoraNode.",
        "The soft head ellipse of each crop (all ones with head_mask=none).",
        "Per photo: kept (roll corrected) or dropped.",
    )

    @classmethod
    def VALIDATE_INPUTS(cls, context=None):  # NaN/inf, min/max of float widgets
        return finite_floats(cls, "FaceChainPreprocess", context=context)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The user's photos (the IMAGE that went into FaceDetectCrop)."}),
            "faces": ("FACES", {"tooltip": "FaceDetectCrop's faces of 'image' (upright=rotate_if_no_face finds "
                      "faces on their side; select=largest keeps one face per photo)."}),
            "resolution": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 8, "tooltip":
                           "Training resolution (FaceChain: 512 for SD1.5)."}),
            "context": ("FLOAT", {"default": 2.0, "min": 1.0, "max": 4.0, "step": 0.05, "tooltip":
                        "Crop side in units of the aligned face region: 1 is the face only, 2 head and a little "
                        "shoulder (FaceChain centres the head)."}),
            "head_mask": (["ellipse", "none"], {"default": "ellipse", "tooltip":
                          "ellipse: a soft ellipse over face, forehead and chin from the landmarks (an "
                          "approximation of FaceChain's head segmentation). none: the mask is all ones."}),
            "background": (["keep", "white", "grey"], {"default": "keep", "tooltip":
                           "Fill outside the head mask: keep the photo, or white/grey (FaceChain trains on the "
                           "segmented head). Ignored with head_mask=none."}),
        }}

    def prepare(self, image, faces, resolution, context, head_mask, background):
        node = "FaceChainPreprocess"
        imgs = image_to_numpy(image, node)
        faces = _check_faces(node, faces, imgs)
        rows = [r for r in range(len(faces)) if _real(faces, r)]
        if not rows:
            raise ValueError(f"{node}: no face found in any of the {imgs.shape[0]} photo(s); FaceChain needs "
                             "photos where FaceDetectCrop finds the face. Lower its min_size or use other photos.")
        mask = fusion.ellipse_mask(context, resolution, 0.15) if head_mask == "ellipse" else \
            np.ones((resolution, resolution), np.float32)
        crops, masks, lines = [], [], []
        for r in rows:
            i = faces.source_index[r]
            m = fusion.region_affine(faces.affine_arcface[r].numpy(), context, resolution)
            c = fusion.cut(imgs[i], m, resolution)
            if head_mask == "ellipse" and background != "keep":
                fill = 1.0 if background == "white" else 0.5
                c = c * mask[..., None] + fill * (1.0 - mask[..., None])
            crops.append(c)
            masks.append(mask)
            turned = -fusion.roll_degrees(faces.affine_arcface[r].numpy())
            lines.append(f"photo {i}: face {r} kept, turned {turned:+.0f} deg upright")
        dropped = sorted(set(range(imgs.shape[0])) - {faces.source_index[r] for r in rows})
        lines += [f"photo {i}: no face, dropped" for i in dropped]
        if dropped:
            log.warning("[facecond] %s: no face in photo(s) %s; dropped from the training set", node, dropped)
        report = f"{len(rows)} training image(s) at {resolution}px\n" + "\n".join(lines)
        return (torch.from_numpy(np.stack(crops).astype(np.float32)).clamp(0, 1),
                torch.from_numpy(np.stack(masks).astype(np.float32)), report)


NODE_CLASS_MAPPINGS = {
    "FacecondChooseTemplateFace": FacecondChooseTemplateFace,
    "FacecondRankBySimilarity": FacecondRankBySimilarity,
    "FacecondFaceFusion": FacecondFaceFusion,
    "FacecondFaceChainPreprocess": FacecondFaceChainPreprocess,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FacecondChooseTemplateFace": "ChooseTemplateFace",
    "FacecondRankBySimilarity": "RankBySimilarity",
    "FacecondFaceFusion": "FaceFusion",
    "FacecondFaceChainPreprocess": "FaceChainPreprocess",
}
