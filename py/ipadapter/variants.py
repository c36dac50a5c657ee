"""Which IP-Adapter a file is, from its ``image_proj`` keys and shapes (and, for the two cases the keys cannot tell,
the file's LoRA and name). The projection modules are ``projections.py``; the layouts are those of the authors'
files (h94/IP-Adapter, h94/IP-Adapter-FaceID; tencent-ailab/IP-Adapter's ``ip_adapter*.py``):

=================  ========================================================  ==============================
variant            image_proj keys                                           takes
=================  ========================================================  ==============================
plain              proj, norm                                                CLIP image embedding
plus (plus-face)   latents, proj_in, layers.*, proj_out, norm_out            CLIP penultimate hidden states
full (full-face)   proj.0, proj.2, proj.3 (LayerNorm)                        CLIP penultimate hidden states
faceid             proj.0, proj.2, norm (+ the file's LoRA)                  insightface embedding
faceid_portrait    proj.0, proj.2, norm, 16 tokens, no LoRA                  several insightface embeddings
faceid_plus(v2)    proj.0, proj.2, norm, perceiver_resampler.*               insightface embedding + CLIP
                                                                             hidden states of the face crop
=================  ========================================================  ==============================

FaceID Plus and Plus v2 files have the same keys: v2 is told by its file name (``plusv2``, as published), the way
the authors' loaders and IPAdapter_plus tell it. SD1.5 files have 768-wide tokens, SDXL files 2048.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..weights.packfile import clip

# What each variant consumes: a CLIP image embedding (projected, e.g. 1024 for ViT-H), the CLIP penultimate
# hidden states (257 x 1280 for ViT-H), a face-recognition embedding (512 for insightface buffalo_l), or both of the
# last two (FaceID Plus: the face embedding and the hidden states of the aligned face crop).
INPUT_KINDS = {"plain": "clip_embeds", "plus": "clip_hidden", "full": "clip_hidden", "faceid": "face",
               "faceid_portrait": "face", "faceid_plus": "face+clip_hidden", "faceid_plusv2": "face+clip_hidden"}
TITLES = {"plain": "IP-Adapter", "plus": "IP-Adapter plus", "full": "IP-Adapter full-face", "faceid": "FaceID",
          "faceid_portrait": "FaceID Portrait", "faceid_plus": "FaceID Plus", "faceid_plusv2": "FaceID Plus v2"}
SUPPORTED = ("supported are IP-Adapter plain, plus / plus-face, full-face, FaceID, FaceID Portrait, FaceID Plus and "
             "FaceID Plus v2, in the SD1.5 and SDXL layouts")
PORTRAIT_TOKENS = 16  # ip-adapter-faceid-portrait*_sd15 / _sdxl: 16 tokens per face, no LoRA


@dataclass(frozen=True)
class Variant:
    name: str  # a key of INPUT_KINDS
    input_dim: int  # width of the embedding the projection takes (the face embedding for FaceID Plus)
    tokens: int  # image tokens it makes per reference (full-face: per CLIP hidden state)
    cross_dim: int  # token width (the UNet's cross-attention context width: 768 SD1.5, 2048 SDXL)
    clip_dim: int = 0  # FaceID Plus: width of the CLIP hidden states the resampler reads (1280 for ViT-H)

    @property
    def input_kind(self) -> str:
        return INPUT_KINDS[self.name]

    @property
    def face_mlp(self) -> bool:
        return self.name in ("faceid", "faceid_portrait")

    @property
    def title(self) -> str:
        base = {768: "SD1.5", 2048: "SDXL"}.get(self.cross_dim, f"{self.cross_dim}-d context")
        return f"{TITLES[self.name]} ({base})"


# Bounds on what a file's shapes may declare (README "Limits"): checked before any module is built.
MAX_WIDTH, MAX_TOKENS, MAX_DEPTH, MAX_LAYERS = 8192, 1024, 64, 256

# Layouts the pack recognises and does not load: (test on the flat keys, name, what to use instead)
UNSUPPORTED = (
    (lambda sd, p: any(k.startswith(("id_adapter", "pulid")) for k in sd), "PuLID",
     "PuLID is a different method with its own encoder; use a PuLID node pack"),
    (lambda sd, p: any(k.startswith(("double_blocks.", "ip_adapter_proj_model.")) for k in sd),
     "XLabs FLUX IP-Adapter", "it patches FLUX's transformer, not an SD1.5/SDXL UNet"),
    (lambda sd, p: any(k.startswith("time_embedding") for k in p), "SD3.5 IP-Adapter (InstantX)",
     "it patches SD3's transformer, not an SD1.5/SDXL UNet"),
    (lambda sd, p: "latents" in p and "proj_in.weight" in p and p["proj_in.weight"].shape[-1] == 512,
     "InstantID's IP-Adapter (a face embedding through a learned-query Resampler)",
     "InstantID needs its IdentityNet ControlNet; use an InstantID node pack"),
)


def unsupported(sd: dict[str, torch.Tensor], proj: dict[str, torch.Tensor]) -> tuple[str, str] | None:
    """(name, why) of a recognised layout the pack does not load, else None."""
    for test, name, why in UNSUPPORTED:
        try:
            if test(sd, proj):
                return name, why
        except (AttributeError, IndexError):
            continue
    return None


def is_v2(file_name: str) -> bool:
    """FaceID Plus v2 files carry ``plusv2`` in their published names (ip-adapter-faceid-plusv2_sd15.bin)."""
    return re.search(r"plus[-_ ]?v2", file_name or "", re.IGNORECASE) is not None


def detect_variant(proj: dict[str, torch.Tensor], *, has_lora: bool = False, file_name: str = "") -> Variant:
    """The projection variant from the ``image_proj`` keys (prefix stripped) and their shapes; ValueError when the
    layout is unknown or its shapes are outside ``MAX_WIDTH``/``MAX_TOKENS``."""
    try:
        v = _variant(proj, has_lora, file_name)
    except (IndexError, ZeroDivisionError, AttributeError, ValueError):  # too few dimensions or a zero width
        v = None
    if v is None:
        raise ValueError(f"unsupported IP-Adapter image projection (keys {clip(sorted(proj)[:8])}...): {SUPPORTED}.")
    if not (1 <= v.input_dim <= MAX_WIDTH and 1 <= v.tokens <= MAX_TOKENS and 1 <= v.cross_dim <= MAX_WIDTH
            and 0 <= v.clip_dim <= MAX_WIDTH):
        raise ValueError(f"IP-Adapter image projection of {v.input_dim}-d input, {v.tokens} tokens of width "
                         f"{v.cross_dim}: outside the sizes the pack loads (widths 1..{MAX_WIDTH}, 1..{MAX_TOKENS} "
                         "tokens); the file is damaged or not an SD IP-Adapter.")
    return v


def _variant(proj: dict[str, torch.Tensor], has_lora: bool, file_name: str) -> Variant | None:
    if "latents" in proj and "proj_in.weight" in proj and "proj_out.weight" in proj:  # Resampler (IP-Adapter plus)
        width, tokens = proj["proj_in.weight"].shape[1], proj["latents"].shape[1]
        return Variant("plus", width, tokens, proj["proj_out.weight"].shape[0])
    if "proj.weight" in proj and "norm.weight" in proj:  # Linear + LayerNorm (plain)
        cross = proj["norm.weight"].shape[0]
        return Variant("plain", proj["proj.weight"].shape[1], proj["proj.weight"].shape[0] // cross, cross)
    if {"proj.0.weight", "proj.2.weight", "proj.3.weight"} <= proj.keys() and "norm.weight" not in proj:
        cross = proj["proj.3.weight"].shape[0]  # full-face MLPProjModel: Linear, GELU, Linear, LayerNorm per token
        return Variant("full", proj["proj.0.weight"].shape[1], 1, cross)
    if {"proj.0.weight", "proj.2.weight", "norm.weight"} <= proj.keys() and "proj.3.weight" not in proj:
        cross = proj["norm.weight"].shape[0]  # FaceID MLPProjModel: Linear, GELU, Linear, LayerNorm
        d, tokens = proj["proj.0.weight"].shape[1], proj["proj.2.weight"].shape[0] // cross
        if "perceiver_resampler.proj_in.weight" in proj:  # ProjPlusModel: + FacePerceiverResampler
            clip_dim = proj["perceiver_resampler.proj_in.weight"].shape[1]
            return Variant("faceid_plusv2" if is_v2(file_name) else "faceid_plus", d, tokens, cross, clip_dim)
        if any(k.startswith("perceiver_resampler.") for k in proj):
            return None
        name = "faceid_portrait" if tokens == PORTRAIT_TOKENS and not has_lora else "faceid"
        return Variant(name, d, tokens, cross)
    return None
