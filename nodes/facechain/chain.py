"""FaceChain's finishing chain (Liu et al., "FaceChain: A Playground for Human-centric Artificial Intelligence
Generated Content", arXiv 2308.14256): preprocessing of the user's photos for a face-LoRA, template-face
choice by face quality and similarity ranking against the template; face fusion of generated images is in
``fusion.py``.

Thin ComfyUI wrappers over ``py/facechain/`` (``quality``, ``ranking``, ``fusion``); faces come from
FaceDetectCrop (FACES), embeddings from FaceEmbed (FACE_EMBEDS). The LoRAs themselves are ComfyUI's own
(LoraLoader; TrainLoraNode in comfy_extras/nodes_train.py).
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace

import numpy as np
import torch

from ...py.facechain import fusion, ranking, retouch
from ...py.facechain import quality as face_quality
from ...py.faces.types import Faces
from ..common import FACE_EMBEDS, FACES, image_to_numpy, numpy_to_image, require_embeds, require_faces
from ..model_family import NATIVE_TOOLTIP, resolve_resolution
from ..paths import finite_floats

log = logging.getLogger("facecond")

CATEGORY = "facecond/facechain"


def check_faces(node: str, faces, imgs: np.ndarray, image_name: str = "image") -> Faces:
    """``faces``, checked to be FaceDetectCrop's faces of the images ``imgs`` (B, H, W, 3) of input image_name."""
    require_faces(node, "faces", faces)
    b, h, w = imgs.shape[:3]
    if faces.num_images != b or tuple(faces.image_size) != (h, w):
        raise ValueError(f"{node}: 'faces' were found in {faces.num_images} image(s) of {faces.image_size[0]}x"
                         f"{faces.image_size[1]} but '{image_name}' is {b} image(s) of {h}x{w}. Connect the same "
                         f"IMAGE to FaceDetectCrop and to this node's '{image_name}'.")
    return faces


def real_face(faces: Faces, row: int) -> bool:
    """False for FaceDetectCrop's no_face='passthrough' stand-ins (score 0)."""
    return float(faces.scores[row]) > 0.0


class FacecondChooseTemplateFace:
    DESCRIPTION = ("FaceChain's template face: among the faces of the user's photos, the one with the best face-"
                   "quality score Q = visibility x (0.15 confidence + 0.15 size + 0.35 frontality + 0.35 "
                   "sharpness) (formula in py/facechain/quality.py). Outputs that face, its photo, its aligned crop "
                   "and every face's score.")
    CATEGORY = CATEGORY
    FUNCTION = "choose"
    RETURN_TYPES = (FACES, "IMAGE", "IMAGE", "STRING", "INT")
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
            "faces": (FACES, {"tooltip": "Faces of the user's photos (FaceDetectCrop, select=largest or all)."}),
            "image": ("IMAGE", {"tooltip": "The same photos that went into FaceDetectCrop."}),
        }}

    def choose(self, faces, image):
        node = "ChooseTemplateFace"
        imgs = image_to_numpy(image, node)
        faces = check_faces(node, faces, imgs)
        rows = [r for r in range(len(faces)) if real_face(faces, r)]
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
        photo = numpy_to_image(imgs[src:src + 1].copy())
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
            "face_embeds": (FACE_EMBEDS, {"tooltip": "FaceEmbed of FaceDetectCrop on 'images' (any no_face "
                            "policy: images without a row, or with a passthrough row when 'faces' is given, "
                            "count as faceless)."}),
            "template_embeds": (FACE_EMBEDS, {"tooltip": "FaceEmbed of the template face (same model). Several "
                                "rows: their mean direction is the template."}),
            "top_k": ("INT", {"default": 2, "min": 1, "max": 4096, "tooltip":
                      "How many of the best images top_k_images holds (fewer if the batch is smaller)."}),
            "temperature": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 10.0, "step": 0.01, "tooltip":
                            "0: scores are the cosine. > 0: softmax(cosine / T) over the images with a face "
                            "(FaceChain's temperature scaling; 0.1 is sharp, 1 flat). The order is the same."}),
        }, "optional": {
            "faces": (FACES, {"tooltip": "FaceDetectCrop's faces of 'images' (optional): its no_face='passthrough' "
                      "stand-ins (score 0) are then treated as no face instead of being ranked."}),
        }}

    def rank(self, images, face_embeds, template_embeds, top_k, temperature, faces=None):
        node = "RankBySimilarity"
        imgs = image_to_numpy(images, node, "images")
        n = imgs.shape[0]
        require_embeds(node, "template_embeds", template_embeds, finite=False)
        require_embeds(node, "face_embeds", face_embeds, dim=template_embeds.dim, embedder=template_embeds.model,
                       against="template_embeds holds", allow_empty=True, finite=False)
        valid = None
        if faces is not None:
            faces = check_faces(node, faces, imgs, "images")
            if tuple(faces.source_index) != tuple(face_embeds.source_index):
                raise ValueError(f"{node}: 'faces' and 'face_embeds' list different faces; connect the FACES that "
                                 "went into the FaceEmbed of face_embeds.")
            valid = [real_face(faces, r) for r in range(len(faces))]
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


class FacecondFaceChainPreprocess:
    DESCRIPTION = ("FaceChain's input processing for face-LoRA training: each photo's face is turned upright (by "
                   "its landmarks; FaceDetectCrop's upright correction finds sideways faces), centred and cropped "
                   "square at the training resolution. Optional soft head-ellipse mask (no segmentation model here; "
                   "FaceChain uses human parsing), background fill and skin retouching (edge-preserving smoothing "
                   "inside a skin mask; FaceChain uses a learned retoucher). Photos without a face are dropped.")
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
    def VALIDATE_INPUTS(cls, context=None, retouch_strength=None):  # NaN/inf, min/max of float widgets
        return finite_floats(cls, "FaceChainPreprocess", context=context, retouch_strength=retouch_strength)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The user's photos (the IMAGE that went into FaceDetectCrop)."}),
            "faces": (FACES, {"tooltip": "FaceDetectCrop's faces of 'image' (upright=rotate_if_no_face finds "
                      "faces on their side; select=largest keeps one face per photo)."}),
            "resolution": ("INT", {"default": 0, "min": 0, "max": 2048, "step": 8, "tooltip":
                           "Training resolution (FaceChain trains SD1.5 at 512). " + NATIVE_TOOLTIP + " Without "
                           "'model' connected, 0 is 512."}),
            "context": ("FLOAT", {"default": 2.0, "min": 1.0, "max": 4.0, "step": 0.05, "tooltip":
                        "Crop side in units of the aligned face region: 1 is the face only, 2 head and a little "
                        "shoulder (FaceChain centres the head)."}),
            "head_mask": (["ellipse", "none"], {"default": "ellipse", "tooltip":
                          "ellipse: a soft ellipse over face, forehead and chin from the landmarks (an "
                          "approximation of FaceChain's head segmentation). none: the mask is all ones."}),
            "background": (["keep", "white", "grey"], {"default": "keep", "tooltip":
                           "Fill outside the head mask: keep the photo, or white/grey (FaceChain trains on the "
                           "segmented head). Ignored with head_mask=none."}),
        }, "optional": {
            "retouch_strength": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip":
                                 "Skin retouching (FaceChain's input processing): blend of an edge-preserving "
                                 "(bilateral) smoothing inside a skin-colour mask of the head ellipse. 0: off "
                                 "(the crop is unchanged), 1: fully smoothed skin; eyes, brows, lips and hair keep "
                                 "their edges."}),
            "model": ("MODEL", {"tooltip": "The checkpoint the crops will train (only its family is read): "
                      "resolution 0 becomes its native size."}),
        }}

    def prepare(self, image, faces, resolution, context, head_mask, background, retouch_strength=0.0, model=None):
        node = "FaceChainPreprocess"
        resolution = resolve_resolution(resolution, model, node)
        imgs = image_to_numpy(image, node)
        faces = check_faces(node, faces, imgs)
        rows = [r for r in range(len(faces)) if real_face(faces, r)]
        if not rows:
            raise ValueError(f"{node}: no face found in any of the {imgs.shape[0]} photo(s); FaceChain needs "
                             "photos where FaceDetectCrop finds the face. Lower its min_size or use other photos.")
        ellipse = fusion.ellipse_mask(context, resolution, 0.15)
        mask = ellipse if head_mask == "ellipse" else np.ones((resolution, resolution), np.float32)
        crops, masks, lines = [], [], []
        for r in rows:
            i = faces.source_index[r]
            m = fusion.region_affine(faces.affine_arcface[r].numpy(), context, resolution)
            c = fusion.cut(imgs[i], m, resolution)
            skin = ""
            if retouch_strength > 0:
                c, skin_mask = retouch.retouch(c, ellipse, retouch_strength)
                skin = f", skin retouched ({100 * float((skin_mask > 0.5).mean()):.0f}% of the crop)"
            if head_mask == "ellipse" and background != "keep":
                fill = 1.0 if background == "white" else 0.5
                c = c * mask[..., None] + fill * (1.0 - mask[..., None])
            crops.append(c)
            masks.append(mask)
            turned = -fusion.roll_degrees(faces.affine_arcface[r].numpy())
            lines.append(f"photo {i}: face {r} kept, turned {turned:+.0f} deg upright{skin}")
        dropped = sorted(set(range(imgs.shape[0])) - {faces.source_index[r] for r in rows})
        lines += [f"photo {i}: no face, dropped" for i in dropped]
        if dropped:
            log.warning("[facecond] %s: no face in photo(s) %s; dropped from the training set", node, dropped)
        report = f"{len(rows)} training image(s) at {resolution}px\n" + "\n".join(lines)
        return numpy_to_image(np.stack(crops)).clamp(0, 1), numpy_to_image(np.stack(masks)), report


NODE_CLASS_MAPPINGS = {
    "FacecondChooseTemplateFace": FacecondChooseTemplateFace,
    "FacecondRankBySimilarity": FacecondRankBySimilarity,
    "FacecondFaceChainPreprocess": FacecondFaceChainPreprocess,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FacecondChooseTemplateFace": "ChooseTemplateFace",
    "FacecondRankBySimilarity": "RankBySimilarity",
    "FacecondFaceChainPreprocess": "FaceChainPreprocess",
}
