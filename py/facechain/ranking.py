"""Similarity ranking of generated images against a template face (FaceChain, arXiv 2308.14256, §3.3).

FaceChain's last post-processing step embeds every generated face with a recogniser, compares it with the
template face and keeps the most similar images, best first. Its recogniser (RTS, "relative temperature
scaling") turns similarities into calibrated scores with a temperature; here the temperature is optional:
T = 0 gives the plain cosine, T > 0 a softmax of cosine / T over the images that have a face (the order
is the same either way, the softmax only makes scores comparable as shares of one batch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

NO_FACE_SCORE = -1.0


@dataclass(frozen=True)
class Ranking:
    order: list[int]  # image indices, best first; images without a face last, in their input order
    cosine: list[float]  # per image (input order): best cosine of its faces with the template, or nan
    scores: list[float]  # per image (input order): the reported score (-1 for no face)


def image_cosines(embeds: torch.Tensor, source_index: tuple[int, ...], template: torch.Tensor,
                  num_images: int, valid: list[bool] | None = None) -> list[float]:
    """Per image, the highest cosine between its faces and the template (the mean direction of the
    template rows); nan for an image without a (valid) face. embeds (N, D), template (M, D)."""
    t = F.normalize(F.normalize(template.float(), dim=1).mean(0), dim=0)  # (D,)
    cos = F.normalize(embeds.float(), dim=1) @ t  # (N,)
    out = [float("nan")] * num_images
    for row, img in enumerate(source_index):
        if valid is not None and not valid[row]:
            continue
        if 0 <= img < num_images and (math.isnan(out[img]) or cos[row] > out[img]):
            out[img] = float(cos[row])
    return out


def rank(cosines: list[float], temperature: float = 0.0) -> Ranking:
    """Order images by cosine (best first, stable), faceless (nan) ones last with score -1.

    temperature > 0: scores are softmax(cosine / temperature) over the images with a face.
    """
    has = [not math.isnan(c) for c in cosines]
    with_face = sorted((i for i in range(len(cosines)) if has[i]), key=lambda i: -cosines[i])
    order = with_face + [i for i in range(len(cosines)) if not has[i]]
    scores = [c if h else NO_FACE_SCORE for c, h in zip(cosines, has)]
    if temperature > 0 and with_face:
        logits = torch.tensor([cosines[i] for i in range(len(cosines)) if has[i]], dtype=torch.float64)
        probs = torch.softmax(logits / temperature, dim=0).tolist()
        it = iter(probs)
        scores = [next(it) if h else NO_FACE_SCORE for h in has]
    return Ranking(order, list(cosines), scores)
