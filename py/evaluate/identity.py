"""Identity score of generated images: face-recognition cosine of each image's face with reference faces.

The faces are found and embedded with the pack's own face code (``py/faces``: ``crop.detect_faces`` /
``crop.crop_faces`` and a recogniser from ``embed``), so a score means what FaceEmbed/FaceSimilarity mean.
One face per generated image (the largest). An image without a face is flagged, never an error:
no_face="flag" leaves its score NaN (skipped by the aggregates, counted as faceless); "passthrough" scores the
centre square of the image instead (still flagged) and "zero" counts it as cosine 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..faces import crop
from .metrics import best_of_n, reference_cosines

NO_FACE_MODES = ("flag", "passthrough", "zero")


@dataclass(frozen=True)
class IdentityScores:
    scores: tuple[float, ...]      # per image; NaN when faceless and no_face="flag"
    has_face: tuple[bool, ...]     # a real face was detected
    model: str                     # the recogniser's id
    mode: str                      # reference mode (metrics.REFERENCE_MODES)

    @property
    def faceless(self) -> list[int]:
        return [i for i, f in enumerate(self.has_face) if not f]

    def summary(self, groups=None) -> tuple[float, float]:
        """(best, mean): best-of-N over ``groups`` (one group per image: the batch max) and the mean."""
        groups = groups if groups is not None else [0] * len(self.scores)
        r = best_of_n(list(self.scores), groups)
        return r.best, r.mean

    def report(self) -> str:
        lines = [f"identity score ({self.model}, reference {self.mode}) of {len(self.scores)} image(s); "
                 f"faceless: {self.faceless or 'none'}"]
        for i, (s, f) in enumerate(zip(self.scores, self.has_face)):
            lines.append(f"image {i}: " + ("no face" if math.isnan(s) else f"{s:+.4f}" + ("" if f else " (no face)")))
        return "\n".join(lines)


def scores_from_faces(faces, gen_embeds: torch.Tensor, ref_embeds: torch.Tensor, *, no_face: str = "flag",
                      mode: str = "mean", model: str = "") -> IdentityScores:
    """Scores from a ``Faces`` of the generated batch (FaceDetectCrop, select largest, any no_face policy) and
    the embeddings of its rows. Rows with score 0 are passthrough stand-ins, not faces."""
    if no_face not in NO_FACE_MODES:
        raise ValueError(f"no_face must be one of {NO_FACE_MODES}, got {no_face!r}")
    n = faces.num_images
    cos = reference_cosines(gen_embeds, ref_embeds, mode) if len(gen_embeds) else torch.zeros(0)
    scores = [float("nan")] * n
    has_face = [False] * n
    for row, img in enumerate(faces.source_index):
        real = float(faces.scores[row]) > 0.0
        if not math.isnan(scores[img]) and not real:
            continue  # a real face already scored this image
        if real or no_face == "passthrough":
            scores[img] = float(cos[row])
        has_face[img] = has_face[img] or real
    if no_face == "zero":
        scores = [0.0 if not f else s for s, f in zip(scores, has_face)]
    elif no_face == "flag":
        scores = [s if f else float("nan") for s, f in zip(scores, has_face)]
    return IdentityScores(tuple(scores), tuple(has_face), model, mode)


def detect_and_crop(detector, images01: np.ndarray, *, min_size: int = 20, progress: Callable | None = None,
                    preprocess: str = "facecond", dlib_chips=None):
    """FaceDetectCrop's defaults for scoring: the largest face, upright correction, whole image when faceless.
    preprocess: "facecond" or "insightface" (FaceAnalysis's resize and norm_crop exactly, ``py/faces/detect``);
    dlib_chips: a DlibRecogniser, to cut dlib's chips too."""
    per_image = crop.detect_faces(detector, images01 * 255.0, min_size=min_size, select_mode="largest",
                                  face_index=0, upright="rotate_if_no_face", progress=progress, preprocess=preprocess)
    return crop.crop_faces(images01, per_image, no_face="passthrough", margin_scale=1.0,
                           detector_name=detector.name, node="IdentityScore", min_size=min_size,
                           preprocess=preprocess, dlib_chips=dlib_chips).faces


def is_dlib(recogniser) -> bool:
    return hasattr(recogniser, "shape_predictor")  # py.faces.dlib_rec.DlibRecogniser


def embed_faces(recogniser, faces) -> torch.Tensor:
    """Embed with a py.faces recogniser: FaceNet on the 160 crops, an ONNX recogniser on the aligned 112 ones,
    dlib's ResNet on its 150 chips (L2-normalised, as FaceEmbed's auto)."""
    if is_dlib(recogniser):
        return F.normalize(recogniser.embed(faces.crops_dlib), dim=1)
    if hasattr(recogniser, "net"):  # embed.FaceNet
        return recogniser.embed(faces.crops_facenet, "bottleneck_512")
    return recogniser.embed(faces.crops_arcface, exact=faces.preprocess == "insightface")


def recogniser_id(recogniser) -> str:
    if not is_dlib(recogniser) and hasattr(recogniser, "net"):  # embed.FaceNet: its id names the layer
        return recogniser.model_id("bottleneck_512")
    return recogniser.model_id


def reference_embeds(ref_images01: list[np.ndarray], detector, recogniser, *, min_size: int = 20,
                     preprocess: str = "facecond") -> torch.Tensor:
    """(M, D) embeddings of the reference photos' largest faces (photos without a face are dropped); raises if no
    photo has a face."""
    refs = []
    for photo in ref_images01:
        f = detect_and_crop(detector, photo[None], min_size=min_size, preprocess=preprocess,
                            dlib_chips=recogniser if is_dlib(recogniser) else None)
        if float(f.scores[0]) > 0.0:
            refs.append(embed_faces(recogniser, f))
    if not refs:
        raise ValueError(f"identity score: none of the {len(ref_images01)} reference photo(s) has a face that "
                         f"{detector.name} finds (min_size={min_size}); use closer, frontal photos.")
    return torch.cat(refs)


def score_images(images01: np.ndarray, refs: list[np.ndarray] | torch.Tensor, detector, recogniser, *,
                 no_face: str = "flag", mode: str = "mean", min_size: int = 20,
                 preprocess: str = "facecond") -> IdentityScores:
    """End to end outside ComfyUI: the generated images' faces scored against ``refs``, reference photos (each
    photo's largest face; see ``reference_embeds``) or their embeddings (M, D)."""
    if not isinstance(refs, torch.Tensor):
        refs = reference_embeds(refs, detector, recogniser, min_size=min_size, preprocess=preprocess)
    faces = detect_and_crop(detector, images01, min_size=min_size, preprocess=preprocess,
                            dlib_chips=recogniser if is_dlib(recogniser) else None)
    return scores_from_faces(faces, embed_faces(recogniser, faces), refs, no_face=no_face, mode=mode,
                             model=recogniser_id(recogniser))
