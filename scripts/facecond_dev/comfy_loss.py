"""What the trainers' loss tests compare against: ComfyUI's own ADM vector y and a denoising loss computed by hand
through ComfyUI's own model call (tests/py/train/test_denoiser.py, tests/scripts/test_face0_train_sdxl.py).
Imports ComfyUI lazily: the host must be imported first (tests/conftest.py does)."""

from __future__ import annotations

import torch


def comfy_y(model, cond, latent) -> torch.Tensor:
    """y as ComfyUI's sampler builds it from a conditioning (convert_cond + encode_model_conds(model.extra_conds);
    width/height from the entry, else the latent's size), the positive prompt."""
    import comfy.sampler_helpers
    import comfy.samplers

    conds = comfy.samplers.encode_model_conds(model.model.extra_conds, comfy.sampler_helpers.convert_cond(cond),
                                              latent, torch.device("cpu"), "positive")
    return conds[0]["model_conds"]["y"].cond


def hand_loss(model, x0, sigma, noise, context, y) -> tuple[float, bool]:
    """(eps-MSE of ComfyUI's own ``apply_model(x_t, sigma, c_crossattn, y)`` at x_t = x0 + sigma * noise, whether a
    zero y gives another prediction: y is used)."""
    x_t = x0 + sigma.view(-1, 1, 1, 1) * noise
    with torch.no_grad():
        x0_hat = model.model.apply_model(x_t, sigma, c_crossattn=context, y=y)
        zero_y = model.model.apply_model(x_t, sigma, c_crossattn=context, y=torch.zeros_like(y))
    eps_hat = (x_t - x0_hat) / sigma.view(-1, 1, 1, 1)
    return float(torch.mean((eps_hat - noise) ** 2)), not torch.allclose(x0_hat, zero_y)
