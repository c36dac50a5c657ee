"""The trainers' one denoiser call (py/train/denoiser.py): on SDXL it passes the ADM vector y exactly as ComfyUI's
sampler builds it, and one training step's loss equals a hand-computed denoising loss through ComfyUI's own model
call; on SD1.5 it is the call the trainers made before, bit for bit."""

from __future__ import annotations

import pytest
import torch

from facecond_dev.comfy_loss import comfy_y, hand_loss


@pytest.mark.parametrize("family", ["sdxl"], indirect=True)
def test_sdxl_training_step_loss_equals_comfy_model_call_with_y(family, family_model, family_cond):
    from facecond.nodes.celebbasis.training import model_denoiser
    from facecond.py.train import denoiser
    from facecond.py.train.core import TrainConfig, Trainer, denoising_loss, sample_noise, sample_sigmas, step_generator

    model = family_model[0]
    cond = family_cond
    context, pooled = cond[0][0], cond[0][1]["pooled_output"]
    x0 = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(3))
    y_ref = comfy_y(model, cond, x0)
    y = denoiser.adm_vector(model.model, pooled, 64, 64)
    assert y.shape == (1, 2816) and torch.equal(y, y_ref)

    denoise, sigmas, _device = model_denoiser(model, "TrainTest")  # the Celeb Basis / face TI trainers' denoiser
    delta = torch.zeros(1, 1, context.shape[-1], requires_grad=True)  # a trained offset on every context token

    def loss_fn(step, gen):
        sigma, _ = sample_sigmas(sigmas, 1, gen)
        noise = sample_noise(x0, gen)
        return denoising_loss(lambda x, s, c: denoise(x, s, c, y=y), x0, context + delta, sigma, noise)

    trainer = Trainer({"delta": delta}, TrainConfig(steps=1, lr=1e-2, seed=5))
    losses = trainer.run(loss_fn)
    assert len(losses) == 1 and trainer.step == 1
    assert float(delta.detach().abs().max()) > 0  # the step moved the parameter: gradients flowed through y's model

    gen = step_generator(5, 0)  # the draws of step 0, by hand through ComfyUI's own model call
    sigma, _ = sample_sigmas(sigmas, 1, gen)
    noise = sample_noise(x0, gen)
    hand, y_used = hand_loss(model, x0, sigma, noise, context, y_ref)
    assert losses[0] == pytest.approx(hand, rel=1e-5, abs=1e-7)
    assert y_used  # a zero y gives another prediction

    with pytest.raises(ValueError, match="needs its ADM vector y"):
        denoiser.denoise(model.model, x0 + sigma.view(-1, 1, 1, 1) * noise, sigma, context)

    # rows with their own original size and crop (Face0 data): each row is ComfyUI's vector for its values
    rows = denoiser.adm_vector(model.model, pooled.repeat(2, 1), [64, 1024], [64, 768], crop_w=[0, 16], crop_h=[0, 8])
    assert torch.equal(rows[0], y_ref[0])
    row1 = comfy_y(model, [[context, {"pooled_output": pooled, "width": 1024, "height": 768, "crop_w": 16,
                                      "crop_h": 8}]], x0)
    assert torch.equal(rows[1], row1[0]) and not torch.equal(rows[0], rows[1])


def test_sd15_denoise_is_the_plain_model_call(tiny_model):
    """SD1.5: no y, no transformer options -> exactly ``apply_model(x, sigma, c_crossattn=...)`` as before."""
    from facecond.py.train import denoiser

    model = tiny_model[0]
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn((2, 4, 8, 8), generator=g), torch.randn((2, 77, 768), generator=g)
    sigma = torch.tensor([1.5, 7.0])
    with torch.no_grad():
        ours = denoiser.denoise(model.model, x, sigma, ctx)
        plain = model.model.apply_model(x, sigma, c_crossattn=ctx)
    assert torch.equal(ours, plain)
    assert denoiser.adm_vector(model.model, torch.zeros(2, 768), 64, 64) is None
    with pytest.raises(ValueError, match="without class conditioning"):
        denoiser.denoise(model.model, x, sigma, ctx, y=torch.zeros(2, 2816))
