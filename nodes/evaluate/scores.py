"""Measuring identity: IdentityScore, CLIPScore and EvalAggregate (the papers' protocols as nodes).

Thin wrappers over ``py/evaluate``: IdentityScore finds and embeds faces with FaceDetectCrop/FaceEmbed's own
code, CLIPScore runs a CLIP model from ``models/facecond/clip_score/<folder>`` (transformers ``CLIPModel``
layout), EvalAggregate combines both into Livshits's ``(1 + clip)(1 + id)`` or Face0's ``text + face`` with
best-of-N and mean. ``scripts/evaluate.py`` runs whole protocols over many identities, prompts and seeds.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import folder_paths
import torch

from ...py.evaluate import clip_score, identity, metrics
from ...py.evaluate.scores import ImageScores, combine, summary_lines
from ...py.faces.types import FaceEmbeds
from ...py.weights.safe_paths import name_problem
from .. import model_cache
from ..common import EVAL_SCORES, FACE_EMBEDS, image_to_numpy
from ..faces.detect_embed import (
    FACENET_MANIFEST,
    FacecondFaceDetectCrop,
    FacecondFaceEmbed,
    insightface_choices,
    recogniser_choices,
)

log = logging.getLogger("facecond")

CATEGORY = "facecond/evaluate"
CLIP_FOLDER = "facecond_clip_score"  # models/facecond/clip_score/<name>/ (config.json, model.safetensors, ...)
_GROUP_TIP = ("Images per group: consecutive blocks of this many images are the seeds of one prompt (best-of-N is "
              "the best of each block, averaged). 0: the whole batch is one group.")


def _clip_choices() -> list[str]:
    return clip_score.list_clip_folders(folder_paths.get_folder_paths(CLIP_FOLDER)) or ["(none found)"]


def _clip_path(name: str, node: str) -> str:
    problem = name_problem(name)
    if problem is not None:
        raise ValueError(f"{node}: input 'clip_model' {name!r} {problem}; pick a folder name from the list "
                         "(models/facecond/clip_score/<name>/).")
    for root in folder_paths.get_folder_paths(CLIP_FOLDER):
        path = os.path.join(root, name)
        if clip_score.is_clip_folder(path):
            return path
    raise FileNotFoundError(
        f"{node}: no CLIP model folder {name!r} in {folder_paths.get_folder_paths(CLIP_FOLDER)}. Put a CLIP model "
        "saved in the transformers layout there (e.g. openai/clip-vit-large-patch14: config.json, "
        "model.safetensors, vocab.json, merges.txt) as models/facecond/clip_score/<name>/.")


def _scores_output(scores: ImageScores, per_group: int, node: str):
    try:
        best, mean, lines = summary_lines(scores, per_group)
    except ValueError as e:
        raise ValueError(f"{node}: {e}; set images_per_group to a divisor of the batch (or 0).") from None
    return best, mean, lines


class FacecondIdentityScore:
    DESCRIPTION = ("Identity score of generated images: the face-recognition cosine of each image's largest face "
                   "with reference faces (the ID score of the face papers), with any recogniser FaceEmbed offers. "
                   "Images without a face are flagged in the report, never an error. Outputs per-image scores, "
                   "the best-of-N and the mean.")
    CATEGORY = CATEGORY
    FUNCTION = "score"
    RETURN_TYPES = (EVAL_SCORES, "FLOAT", "FLOAT", "STRING")
    RETURN_NAMES = ("scores", "best", "mean", "report")
    OUTPUT_TOOLTIPS = (
        "Per-image identity cosines (NaN without a face unless no_face says otherwise), for EvalAggregate.",
        "Best of N: the best image of each group, averaged over groups (NaN if no image has a face).",
        "The mean over images with a score.",
        "One line per image and which had no face.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        detectors = ["mtcnn", *insightface_choices("detection")]
        models = recogniser_choices()
        return {"required": {
            "images": ("IMAGE", {"tooltip": "The generated images to score."}),
            "reference": (FACE_EMBEDS, {"tooltip": "FaceEmbed of the person's reference photo(s), made with the "
                          "same model as chosen here."}),
            "detector": (detectors, {"default": "mtcnn", "tooltip": "Face detector for the generated images "
                         "(as FaceDetectCrop; the largest face of each image is scored)."}),
            "model": (models, {"default": FACENET_MANIFEST, "tooltip": "Face recogniser (as FaceEmbed). Use the one "
                      "that embedded 'reference'; a different one is refused. dlib_resnet_v1: dlib's ResNet, an "
                      "independent judge for methods conditioned on insightface embeddings."}),
            "reference_mode": (list(metrics.REFERENCE_MODES), {"default": "mean", "tooltip":
                               "Several reference photos: mean of the cosines (default), the best one (max), or the "
                               "cosine with their mean direction (centroid)."}),
            "no_face": (list(identity.NO_FACE_MODES), {"default": "flag", "tooltip":
                        "An image without a face. flag: no score (skipped by best/mean, listed in the report). "
                        "zero: counts as cosine 0. passthrough: score the centre square as if it were the face."}),
            "images_per_group": ("INT", {"default": 0, "min": 0, "max": 4096, "tooltip": _GROUP_TIP}),
            "min_size": ("INT", {"default": 20, "min": 8, "max": 4096, "tooltip":
                         "Smallest face to count, in pixels."}),
        }, "optional": {
            "preprocess": (["auto", "insightface", "facecond"], {"default": "auto", "tooltip":
                           "How the generated images' faces are found and cut (FaceDetectCrop's preprocess). auto: "
                           "insightface for an insightface recogniser (FaceAnalysis exactly: its SCRFD letterbox and "
                           "norm_crop, so the score is insightface's), facecond for FaceNet and dlib. Cut the "
                           "reference photos the same way (FaceDetectCrop's preprocess)."}),
        }}

    def score(self, images, reference, detector, model, reference_mode, no_face, images_per_group, min_size,
              preprocess="auto"):
        node = "IdentityScore"
        if not isinstance(reference, FaceEmbeds) or len(reference) == 0:
            raise ValueError(f"{node}: input 'reference' must be a non-empty FACE_EMBEDS; connect FaceEmbed of the "
                             "reference photo(s).")
        image_to_numpy(images, node, "images")  # shape, channel and NaN checks with this node's name
        if preprocess not in ("auto", "insightface", "facecond"):
            raise ValueError(f"{node}: preprocess {preprocess!r} is not one of auto, insightface, facecond.")
        if preprocess == "auto":
            preprocess = "insightface" if model.endswith(".onnx") else "facecond"
        faces = FacecondFaceDetectCrop().detect(images, detector=detector, select="largest", face_index=0,
                                                min_size=min_size, margin_scale=1.0, upright="rotate_if_no_face",
                                                no_face="passthrough", preprocess=preprocess)[0]
        gen = FacecondFaceEmbed().embed(faces, model=model, facenet_layer="bottleneck_512", normalize="auto")[0]
        if gen.model != reference.model or gen.dim != reference.dim:
            raise ValueError(f"{node}: 'reference' was embedded with {reference.model!r} ({reference.dim}-d) but "
                             f"model is {gen.model!r} ({gen.dim}-d). Pick the same model here and in the FaceEmbed "
                             "of the reference.")
        res = identity.scores_from_faces(faces, gen.embeds, reference.embeds, no_face=no_face, mode=reference_mode,
                                         model=gen.model)
        scores = ImageScores("identity", res.scores, res.model)
        best, mean, lines = _scores_output(scores, images_per_group, node)
        lines.insert(1, f"preprocessing {preprocess}, detector {detector}")
        if res.faceless:
            log.info("[facecond] %s: no face in image(s) %s (%s)", node, res.faceless, no_face)
            lines.insert(1, f"no face in image(s) {res.faceless} (no_face={no_face})")
        return (scores, best, mean, "\n".join(lines))


def _managed(scorer: clip_score.ClipScorer) -> clip_score.ClipScorer:
    """The scorer with a plain module around its transformers CLIPModel (whose read-only ``device`` property a
    ModelPatcher cannot set): what the model cache hands to ComfyUI."""
    scorer.managed = torch.nn.ModuleList([scorer.model])
    return scorer


class FacecondCLIPScore:
    DESCRIPTION = ("CLIP score: the cosine of each image's CLIP embedding with its prompt's (Livshits's CLIP "
                   "score, Face0's text alignment), with a CLIP model you put in models/facecond/clip_score/<name>/ "
                   "(transformers CLIPModel layout, e.g. ViT-L/14). Nothing is downloaded.")
    CATEGORY = CATEGORY
    FUNCTION = "score"
    RETURN_TYPES = (EVAL_SCORES, "FLOAT", "FLOAT", "STRING")
    RETURN_NAMES = ("scores", "best", "mean", "report")
    OUTPUT_TOOLTIPS = (
        "Per-image image-text cosines, for EvalAggregate.",
        "Best of N: the best image of each group, averaged over groups.",
        "The mean over all images.",
        "One line per image.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "images": ("IMAGE", {"tooltip": "The generated images to score."}),
            "prompts": ("STRING", {"multiline": True, "default": "a photo of a person", "tooltip":
                        "One prompt per line: one line for the whole batch, or k lines for k·m images (the m images "
                        "of each prompt consecutive). Write the person as plain words, not a pseudo-word."}),
            "clip_model": (_clip_choices(), {"tooltip": "A folder in models/facecond/clip_score/ holding a CLIP "
                           "model in the transformers layout (config.json, model.safetensors, vocab.json, "
                           "merges.txt)."}),
            "images_per_group": ("INT", {"default": 0, "min": 0, "max": 4096, "tooltip": _GROUP_TIP}),
        }}

    def score(self, images, prompts, clip_model, images_per_group):
        node = "CLIPScore"
        x = torch.from_numpy(image_to_numpy(images, node, "images"))
        texts = clip_score.prompts_for(prompts.splitlines(), x.shape[0], node)
        folder = Path(_clip_path(clip_model, node)).resolve()
        files = tuple(sorted(p for p in folder.iterdir() if p.is_file()))  # the folder's identity: all its files
        scorer = model_cache.load("clip-score", files, lambda _p: _managed(clip_score.load_clip_scorer(folder)),
                                  lambda s: s.managed)
        model_cache.to_device(scorer.managed)
        cos = scorer.cosines(x, texts)
        scores = ImageScores("clip", tuple(float(c) for c in cos), scorer.model_id)
        best, mean, lines = _scores_output(scores, images_per_group, node)
        return (scores, best, mean, "\n".join(lines))


class FacecondEvalAggregate:
    DESCRIPTION = ("The papers' aggregate of identity and CLIP scores per image: livshits = (1 + clip)·(1 + id) "
                   "(Livshits 2023), face0 = text + face alignment (Face0 2023); with the best of N seeds per "
                   "prompt and the mean, as the papers' tables report them.")
    CATEGORY = CATEGORY
    FUNCTION = "combine"
    RETURN_TYPES = (EVAL_SCORES, "FLOAT", "FLOAT", "STRING")
    RETURN_NAMES = ("scores", "best", "mean", "report")
    OUTPUT_TOOLTIPS = (
        "Per-image aggregate (NaN where the identity score is missing).",
        "Best of N: the best image of each group (one prompt's seeds), averaged over groups.",
        "The mean over images with a value.",
        "The three metrics' summaries and the per-image aggregate.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "identity_scores": (EVAL_SCORES, {"tooltip": "IdentityScore's scores."}),
            "clip_scores": (EVAL_SCORES, {"tooltip": "CLIPScore's scores of the same images."}),
            "aggregate": (list(metrics.AGGREGATES), {"default": "livshits", "tooltip":
                          "livshits: (1 + clip)·(1 + id). face0: clip + id (Face0's overall score)."}),
            "images_per_group": ("INT", {"default": 0, "min": 0, "max": 4096, "tooltip": _GROUP_TIP}),
        }}

    def combine(self, identity_scores, clip_scores, aggregate, images_per_group):
        node = "EvalAggregate"
        for name, s, want in (("identity_scores", identity_scores, "identity"), ("clip_scores", clip_scores, "clip")):
            if not isinstance(s, ImageScores) or s.metric != want:
                raise ValueError(f"{node}: input '{name}' must come from "
                                 f"{'IdentityScore' if want == 'identity' else 'CLIPScore'}.")
        try:
            agg = combine(identity_scores, clip_scores, aggregate)
        except ValueError as e:
            raise ValueError(f"{node}: {e}.") from None
        best, mean, lines = _scores_output(agg, images_per_group, node)
        for s in (identity_scores, clip_scores):
            lines.insert(1, _scores_output(s, images_per_group, node)[2][0])
        if math.isnan(mean):
            log.warning("[facecond] %s: no image has both scores (no faces found?)", node)
        return (agg, best, mean, "\n".join(lines))


NODE_CLASS_MAPPINGS = {
    "FacecondIdentityScore": FacecondIdentityScore,
    "FacecondCLIPScore": FacecondCLIPScore,
    "FacecondEvalAggregate": FacecondEvalAggregate,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FacecondIdentityScore": "IdentityScore",
    "FacecondCLIPScore": "CLIPScore",
    "FacecondEvalAggregate": "EvalAggregate",
}
