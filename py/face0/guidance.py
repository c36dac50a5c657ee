"""Face0's three-way classifier-free guidance, as pure tensor maths.

Face0 (Valevski et al. 2023, "Face0: Instantaneously Conditioning a Text-to-Image Model on a Face", §3.3)
samples with a text prompt d and a face f:

    ε̃ = c·ε(z, d, f) + (1 − c)·( a·ε(z, f) + (1 − a)·ε(z, d) )       # combined conditional prediction
    ε̂ = w·ε̃ + (1 − w)·ε(z)                                           # classifier-free guidance, w = 7.5

where ε(z) is the unconditional branch (empty text, zero face). c = 1 is plain CFG ("photo mode");
c < 1 raises the text-only weight for non-photographic styles ("style mode").

The combination is affine in the branch predictions with weights summing to 1, so it is the same whether
it is applied to noise predictions ε or to denoised predictions x0 = x − σ·ε (what ComfyUI's guiders hand
around): Σ wᵢ·(x − σ·εᵢ) = x − σ·Σ wᵢ·εᵢ when Σ wᵢ = 1. ComfyUI's guiders therefore combine x0.

Written as ε̂ = ε(∅) + w·(ε̃ − ε(∅)), it is ordinary CFG between the *combined* conditional ε̃ and the
unconditional: the guider runs the pre-CFG hooks on [ε̃, ε(∅)] and feeds ε̃ to ComfyUI's ``cfg_function`` as
``cond_denoised``, so pre-CFG hooks (LatentApplyOperationCFG, APG), CFG patches (RescaleCFG, ...) and post-CFG
hooks see the same thing they see under plain CFG.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

# Order of branches everywhere in the pack (guider, tests, bench). Positions 0 and 1 are ComfyUI's
# cond/uncond positions (what a ``sampler_calc_cond_batch_function`` sees first).
BRANCHES = ("text_face", "uncond", "text", "face")


@dataclass(frozen=True)
class BranchWeights:
    """Weights of the four branches in ε̂ (they sum to 1) and of the three in ε̃ (they sum to 1)."""

    text_face: float  # weight of ε(d, f) inside ε̃: c
    text: float       # weight of ε(d) inside ε̃: (1 − c)(1 − a)
    face: float       # weight of ε(f) inside ε̃: (1 − c)·a
    cfg: float        # w

    def needed(self, skip_uncond_at_cfg1: bool = True) -> dict[str, bool]:
        """Which branches must be evaluated. A branch whose weight is 0 is not run.

        The unconditional branch has weight 1 − w in ε̂; like ComfyUI's ``sampling_function`` it is skipped
        at w = 1 only when the caller allows it (``disable_cfg1_optimization`` unset).
        """
        return {
            "text_face": not _is_zero(self.text_face),
            "uncond": not (skip_uncond_at_cfg1 and math.isclose(self.cfg, 1.0)),
            "text": not _is_zero(self.text),
            "face": not _is_zero(self.face),
        }


def _is_zero(v: float) -> bool:
    return math.isclose(v, 0.0, abs_tol=1e-9)


def branch_weights(w: float, c: float, a: float) -> BranchWeights:
    """Face0 §3.3 weights: ε̃ = c·ε(d,f) + (1−c)(a·ε(f) + (1−a)·ε(d)). c, a may leave [0, 1] (extrapolation)."""
    for name, v in (("w", w), ("c", c), ("a", a)):
        if not math.isfinite(v):
            raise ValueError(f"three-way guidance: {name} must be a finite number, got {v}")
    return BranchWeights(text_face=float(c), text=float((1.0 - c) * (1.0 - a)), face=float((1.0 - c) * a),
                         cfg=float(w))


def combine_conditional(weights: BranchWeights, text_face: torch.Tensor | None, text: torch.Tensor | None,
                        face: torch.Tensor | None) -> torch.Tensor:
    """ε̃ from the branch predictions (ε or x0; the same affine combination). Skipped branches may be None.

    When only one branch has a non-zero weight and that weight is exactly 1 (c = 1; or c = 0 with a ∈ {0, 1}),
    that tensor is returned as is, so c = 1 reproduces plain CFG bit for bit.
    """
    terms = [(weights.text_face, text_face, "text_face"), (weights.text, text, "text"), (weights.face, face, "face")]
    live = [(wt, t, n) for wt, t, n in terms if not _is_zero(wt)]
    for wt, t, n in live:
        if t is None:
            raise ValueError(f"three-way guidance: branch '{n}' has weight {wt:g} but was not evaluated")
    if not live:  # c = 1 + 0 + 0 cannot all vanish since the weights sum to 1; guard anyway
        raise ValueError("three-way guidance: every conditional branch has weight 0")
    if len(live) == 1 and live[0][0] == 1.0:
        return live[0][1]
    out = live[0][1] * live[0][0]
    for wt, t, _ in live[1:]:
        out = out + t * wt
    return out


def three_way_cfg(weights: BranchWeights, text_face, text, face, uncond,
                  cfg_function: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None
                  ) -> torch.Tensor:
    """ε̂ = ε(∅) + w·(ε̃ − ε(∅)) = w·ε̃ + (1 − w)·ε(∅), in ComfyUI's CFG form (``cfg_function``'s arithmetic).

    ``cfg_function(cond, uncond)``: the host's own CFG step, given ε̃ as ``cond`` and ε(∅) (the guider passes
    ComfyUI's ``samplers.cfg_function`` so CFG patches and post-CFG hooks run); without patches it is the
    formula above. None: that formula here.
    """
    cond = combine_conditional(weights, text_face, text, face)
    if cfg_function is not None:
        return cfg_function(cond, uncond)
    if uncond is None:
        if not math.isclose(weights.cfg, 1.0):
            raise ValueError("three-way guidance: the unconditional branch is needed when w != 1")
        return cond
    return uncond + (cond - uncond) * weights.cfg
