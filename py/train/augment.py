"""Training-time image augmentation (Celeb Basis, Yuan et al. 2023 §4.1: colour jitter, random resize, random
shift), seeded by the caller's generator. Images are (B, 3, H, W) float in [0, 1]; the output keeps H, W."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    brightness: float = 0.2  # factor drawn from [1 - b, 1 + b]
    contrast: float = 0.2
    saturation: float = 0.2
    scale: tuple[float, float] = (0.85, 1.15)  # random resize factor; the result is centre-cropped/padded back
    shift: float = 0.1  # max translation as a fraction of the side


def _u(g: torch.Generator, lo: float, hi: float, n: int) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def augment(x: torch.Tensor, g: torch.Generator, cfg: AugmentConfig = AugmentConfig()) -> torch.Tensor:
    b, _, h, w = x.shape
    dev = x.device
    x = x.float()
    # colour jitter: brightness, contrast (around the mean grey), saturation (around the luma)
    x = x * _u(g, 1 - cfg.brightness, 1 + cfg.brightness, b).to(dev).view(b, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * _u(g, 1 - cfg.contrast, 1 + cfg.contrast, b).to(dev).view(b, 1, 1, 1) + mean
    luma = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    x = (x - luma) * _u(g, 1 - cfg.saturation, 1 + cfg.saturation, b).to(dev).view(b, 1, 1, 1) + luma
    x = x.clamp(0, 1)
    # random resize + shift as one affine resampling (zoom s about the centre, then translate), edge-padded
    s = _u(g, *cfg.scale, b)
    t = _u(g, -cfg.shift, cfg.shift, 2 * b).view(b, 2) * 2  # grid units: the side is 2
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / s
    theta[:, :, 2] = -t / s.view(b, 1)
    grid = F.affine_grid(theta.to(dev), [b, 3, h, w], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
