"""What the pack's nodes share: socket type names, input checks, widget specs, progress, IMAGE conversions.

- Socket types: every custom type name is declared here once and used by INPUT_TYPES / RETURN_TYPES.
- ``require_embeds`` / ``require_faces``: the FACE_EMBEDS / FACES checks, with errors that name the node, the
  input, what was found against what was expected, and the fix.
- ``seed_input``, ``steps_input``, ``sampler_inputs``, ``denoise_input``: widget specs (names, defaults and
  ranges as ComfyUI's KSampler; the tooltip is the caller's).
- ``Progress``: a ComfyUI progress bar that is also ``py/train/core.Trainer.run``'s progress callback.
- ``image_to_numpy`` / ``numpy_to_image``: ComfyUI IMAGE (B, H, W, C) tensors <-> float32 numpy arrays.
"""

from __future__ import annotations

import logging

import comfy.samplers
import comfy.utils
import numpy as np
import torch

from ..py.faces.types import FaceEmbeds, Faces

log = logging.getLogger("facecond")

# --- socket types -------------------------------------------------------------------------------------------
FACES = "FACES"  # py/faces/types.Faces: crops, boxes, landmarks of the faces of an image batch
FACE_EMBEDS = "FACE_EMBEDS"  # py/faces/types.FaceEmbeds: (N, D) embeddings + the model that made them
FACE0_PROJECTION = "FACE0_PROJECTION"  # py/face0/projection.Face0Projection
CELEB_MLP = "CELEB_MLP"  # nodes/celebbasis/files.CelebMLP: coefficient MLP + what it was trained for
CELEB_COEFFS = "CELEB_COEFFS"  # py/celebbasis/coeffs.CelebCoeffs: one identity's 2 x p coefficients
CELEB_FACES = "CELEB_FACES"  # py/celebbasis/inversion.CelebFaces: one face embedding per celebrity name
IPADAPTER = "FACECOND_IPADAPTER"  # py/ipadapter/adapter.IPAdapter
REF_EMBEDS = "REF_EMBEDS"  # py/ipadapter/aggregate.RefEmbeds: reference embeddings for an IP-Adapter
EVAL_SCORES = "EVAL_SCORES"  # py/evaluate/scores.ImageScores: per-image ID or CLIP scores

SEED_MAX = 0xFFFFFFFFFFFFFFFF  # as KSampler


# --- input checks -------------------------------------------------------------------------------------------
def require_embeds(node: str, input: str, embeds, *, dim: int | None = None, embedder: str | None = None,
                   against: str = "this node takes", fix: str = "", allow_empty: bool = False,
                   finite: bool = True) -> torch.Tensor:
    """The (N, D) float32 rows of the FACE_EMBEDS input ``input`` of ``node``, checked.

    Checks: it is a FaceEmbeds; it has rows (unless ``allow_empty``); its width is ``dim`` and its embedder id
    is ``embedder`` where given (``"any"`` accepts every embedder); every row finite (if ``finite``).
    ``against`` says what sets dim/embedder, as the start of a clause ("the projection takes", "face_embeds_a
    holds"); ``fix`` is said after the default fix.
    """
    if not isinstance(embeds, FaceEmbeds):
        raise ValueError(f"{node}: input '{input}' must be a {FACE_EMBEDS} (from FaceEmbed, LoadFaceEmbeds or "
                         f"EmbeddingInterpolate); got {type(embeds).__name__}. Connect a FaceEmbed output to it.")
    x = embeds.embeds.float()
    if len(embeds) == 0:
        if allow_empty:
            return x
        raise ValueError(f"{node}: input '{input}' is empty (0 embeddings). Check that FaceDetectCrop found a face "
                         "in every image (its report), or use LoadFaceEmbeds / RandomIdentity.")
    wrong_dim = dim is not None and embeds.dim != dim
    wrong_model = embedder not in (None, "any", embeds.model)
    if wrong_dim or wrong_model:
        want = " ".join(s for s in (f"{dim}-d" if dim is not None else "", "embeddings",
                                    f"from {embedder!r}" if embedder not in (None, "any") else "") if s)
        how = f"Embed the faces with {embedder!r} (FaceEmbed's model)" if embedder not in (None, "any") else \
            f"Use a FaceEmbed model that gives {dim}-d embeddings"
        raise ValueError(f"{node}: input '{input}' holds {embeds.dim}-d embeddings from {embeds.model!r} but "
                         f"{against} {want}. {how}{'; ' + fix if fix else '.'}")
    if finite:
        bad = (~torch.isfinite(x)).any(dim=1).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"{node}: input '{input}' rows {bad} contain NaN or inf. Re-run FaceEmbed on those "
                             "images, or lower the noise / extrapolation of EmbeddingInterpolate.")
    return x


def require_faces(node: str, input: str, faces) -> Faces:
    """The FACES input ``input`` of ``node``; ValueError when something else is connected."""
    if not isinstance(faces, Faces):
        raise ValueError(f"{node}: input '{input}' must be {FACES} from FaceDetectCrop (got "
                         f"{type(faces).__name__}). Connect FaceDetectCrop's faces output to it.")
    return faces


# --- widgets ------------------------------------------------------------------------------------------------
def seed_input(tooltip: str, *, control_after_generate: bool = True) -> tuple:
    """A seed widget (0..2^64-1, as KSampler). ``control_after_generate`` adds the UI's randomize/fixed
    control; saved workflows store its value after the seed, so a shipped node keeps what it has."""
    opts = {"default": 0, "min": 0, "max": SEED_MAX}
    if control_after_generate:
        opts["control_after_generate"] = True
    return ("INT", {**opts, "tooltip": tooltip})


def steps_input(tooltip: str, *, default: int = 20, most: int = 10000) -> tuple:
    return ("INT", {"default": default, "min": 1, "max": most, "tooltip": tooltip})


def sampler_inputs() -> dict[str, tuple]:
    """KSampler's sampler_name and scheduler choices, in that order."""
    return {"sampler_name": (comfy.samplers.KSampler.SAMPLERS, {"tooltip": "The sampling algorithm."}),
            "scheduler": (comfy.samplers.KSampler.SCHEDULERS, {"tooltip": "The noise schedule."})}


def denoise_input(tooltip: str, *, default: float = 1.0) -> tuple:
    return ("FLOAT", {"default": default, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": tooltip})


# --- progress -----------------------------------------------------------------------------------------------
class Progress:
    """A ComfyUI progress bar of ``total`` steps, called as ``progress(done)`` or, as the progress callback of
    ``py/train/core.Trainer.run``, ``progress(done, total, loss)``. With a loss and a ``label`` it also logs
    "<label> step done/total loss L" at the first step, every ``every``-th step and the last step."""

    def __init__(self, total: int, label: str = "", every: int = 10):
        self.bar = comfy.utils.ProgressBar(max(1, int(total)))
        self.label, self.every = label, every

    def __call__(self, done: int, total: int | None = None, loss: float | None = None) -> None:
        self.bar.update_absolute(done, total)
        total = self.bar.total
        if loss is not None and self.label and (done == 1 or done % self.every == 0 or done == total):
            log.info("[facecond] %s step %d/%d loss %.5f", self.label, done, total, loss)


# --- IMAGE <-> numpy ----------------------------------------------------------------------------------------
MAX_IMAGE_SIDE = 16384  # ComfyUI's own MAX_RESOLUTION
MAX_IMAGE_PIXELS = 1 << 28  # B·H·W of one IMAGE input: 256 images of 1024², 3 GB as float32 RGB (README "Limits")


def image_to_numpy(image: torch.Tensor, node: str, name: str = "image") -> np.ndarray:
    """A ComfyUI IMAGE as (B, H, W, 3) float32 in [0, 1]; greyscale/alpha/odd ranges handled, NaN refused."""
    if not isinstance(image, torch.Tensor) or image.ndim not in (3, 4):
        raise ValueError(f"{node}: input '{name}' must be an IMAGE tensor (B, H, W, C); got "
                         f"{getattr(image, 'shape', type(image).__name__)}.")
    x = image if image.ndim == 4 else image.unsqueeze(0)
    b, h, w = x.shape[:3]
    if min(b, h, w) < 1 or max(h, w) > MAX_IMAGE_SIDE or b * h * w > MAX_IMAGE_PIXELS:
        raise ValueError(f"{node}: input '{name}' is {b} image(s) of {w}x{h}; the pack takes sides of 1 to "
                         f"{MAX_IMAGE_SIDE} pixels and at most {MAX_IMAGE_PIXELS:,} pixels per batch (e.g. 256 images "
                         "of 1024x1024). Resize the images (ImageScale) or split the batch.")
    x = x.detach().float().cpu()
    c = x.shape[-1]
    if c in (1, 2):  # greyscale (+ alpha)
        x = x[..., :1].expand(*x.shape[:-1], 3)
    elif c == 4:  # RGBA: the alpha is ignored, the colour kept
        x = x[..., :3]
    elif c != 3:
        raise ValueError(f"{node}: input '{name}' has {c} channels; expected 1 (grey), 3 (RGB) or 4 (RGBA) "
                         "in the last dimension (ComfyUI IMAGE is B, H, W, C).")
    lo, hi = (float(v) for v in torch.aminmax(x))  # one pass; NaN/Inf anywhere make lo or hi non-finite
    if not (np.isfinite(lo) and np.isfinite(hi)):
        idx = (~torch.isfinite(x).flatten(1).all(1)).nonzero().flatten().tolist()
        raise ValueError(f"{node}: input '{name}' has NaN or infinite pixels in image(s) {idx} of {x.shape[0]}. "
                         "Fix the node that produced it (an fp16 VAE decode often does this: try --fp32-vae or "
                         "a different VAE), or replace the image.")
    if hi > 1.0 or lo < 0.0:
        scale = 1.0 if hi <= 1.0 else 255.0 if hi <= 255.0 else 65535.0 if hi <= 65535.0 else hi
        log.warning("[facecond] %s: '%s' values span %.3g..%.3g, not 0..1; dividing by %g and clipping to 0..1",
                    node, name, lo, hi, scale)
        x = (x / scale).clamp(0.0, 1.0)
    return np.ascontiguousarray(x.numpy(), dtype=np.float32)


def numpy_to_image(array: np.ndarray) -> torch.Tensor:
    """A float32 CPU tensor of ``array`` as it is: (B, H, W, 3) gives an IMAGE, (B, H, W) a MASK. No scaling;
    a float32 contiguous array is shared, not copied."""
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
