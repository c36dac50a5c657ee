"""py/train/core.py: the denoising loss formula, seeded sampling, the Adam loop, exact resume."""

from __future__ import annotations

import pytest
import torch

from facecond.py.train.core import (
    TrainConfig,
    Trainer,
    denoising_loss,
    read_state,
    sample_noise,
    sample_sigmas,
    step_generator,
)

SIGMAS = torch.linspace(0.03, 14.6, 1000)


def _toy():
    """A frozen 'denoiser' (a fixed conv) whose context comes from a trainable linear layer."""
    torch.manual_seed(0)
    frozen = torch.nn.Conv2d(4, 4, 3, padding=1)
    mlp = torch.nn.Linear(8, 4)
    x0 = torch.randn(2, 4, 8, 8)
    feats = torch.randn(2, 8)

    def denoise(x, sigma, ctx):  # returns an x0 estimate, as ComfyUI's apply_model does
        return frozen(x / (sigma.view(-1, 1, 1, 1) ** 2 + 1).sqrt()) + ctx.view(-1, 4, 1, 1)

    def loss_fn(step, g):
        sigma, _ = sample_sigmas(SIGMAS, 2, g)
        noise = sample_noise(x0, g)
        return denoising_loss(denoise, x0, mlp(feats), sigma, noise)

    return frozen, mlp, loss_fn


def test_step_generator_depends_only_on_seed_and_step():
    a = torch.rand(4, generator=step_generator(3, 7))
    assert torch.equal(a, torch.rand(4, generator=step_generator(3, 7)))
    assert not torch.equal(a, torch.rand(4, generator=step_generator(3, 8)))
    assert not torch.equal(a, torch.rand(4, generator=step_generator(4, 7)))


def test_sample_sigmas_uniform_over_table():
    sig, idx = sample_sigmas(SIGMAS, 20000, step_generator(0, 0))
    assert torch.equal(sig, SIGMAS[idx])
    assert idx.min() >= 0 and idx.max() < 1000
    assert abs(idx.float().mean().item() - 499.5) < 8  # uniform: mean 499.5, sd of the mean ~2
    with pytest.raises(ValueError, match="1-d"):
        sample_sigmas(torch.zeros(0), 1, step_generator(0, 0))


def test_denoising_loss_is_eps_mse():
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    sigma = torch.tensor([0.5, 2.0, 9.0])
    eps_hat = torch.randn(3, 4, 5, 5, generator=g)
    x_t = x0 + sigma.view(-1, 1, 1, 1) * noise
    # an x0 predictor whose implied ε̂ is eps_hat
    loss_x0 = denoising_loss(lambda x, s, c: x - s.view(-1, 1, 1, 1) * eps_hat, x0, torch.zeros(1), sigma, noise)
    loss_eps = denoising_loss(lambda x, s, c: eps_hat, x0, torch.zeros(1), sigma, noise, prediction="eps")
    expected = ((eps_hat - noise) ** 2).mean()
    assert torch.allclose(loss_x0, expected, atol=1e-5) and torch.allclose(loss_eps, expected)
    seen = {}
    denoising_loss(lambda x, s, c: seen.setdefault("x", x), x0, torch.zeros(1), sigma, noise)
    assert torch.allclose(seen["x"], x_t)
    with pytest.raises(ValueError, match="prediction"):
        denoising_loss(lambda x, s, c: x, x0, torch.zeros(1), sigma, noise, prediction="v")


def test_trainer_moves_only_its_params_and_loss_falls():
    frozen, mlp, loss_fn = _toy()
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    fixed_batch = lambda: loss_fn(0, step_generator(0, 0)).item()  # noqa: E731  (same σ and ε every call)
    start = fixed_batch()
    tr = Trainer(dict(mlp.named_parameters()), TrainConfig(steps=60, lr=5e-2, seed=0))
    calls = []
    tr.run(loss_fn, progress=lambda done, total, loss: calls.append((done, total)))
    assert calls[0] == (1, 60) and calls[-1] == (60, 60)
    for k, v in frozen.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(p.grad is None for p in frozen.parameters())  # autograd.grad: frozen weights get no .grad
    assert all(p.grad is None for p in mlp.parameters())
    assert fixed_batch() < 0.9 * start


def test_resume_is_bit_exact(tmp_path):
    _, mlp_a, loss_a = _toy()
    full = Trainer(dict(mlp_a.named_parameters()), TrainConfig(steps=6, lr=1e-2, seed=5))
    full.run(loss_a)

    _, mlp_b, loss_b = _toy()
    part = Trainer(dict(mlp_b.named_parameters()), TrainConfig(steps=6, lr=1e-2, seed=5))
    part.run(loss_b, steps=3)
    part.save(tmp_path / "state.safetensors", {"who": "test"})

    _, mlp_c, loss_c = _toy()
    resumed = Trainer(dict(mlp_c.named_parameters()), TrainConfig(steps=6, lr=1e-2, seed=5))
    assert resumed.load(tmp_path / "state.safetensors") == {"who": "test"}
    assert resumed.step == 3
    resumed.run(loss_c)
    for n, p in mlp_a.named_parameters():
        assert torch.equal(p, dict(mlp_c.named_parameters())[n]), n
    assert resumed.losses == full.losses
    meta, tensors = read_state(tmp_path / "state.safetensors")
    assert meta["step"] == 3 and "optim.0.exp_avg" in tensors


def test_resume_under_inference_mode_as_the_server_runs_nodes(tmp_path):
    """ComfyUI executes every node under torch.inference_mode(): a state read there must still let Adam step
    (it failed with 'Inplace update to inference tensor outside InferenceMode')."""
    _, mlp_a, loss_a = _toy()
    full = Trainer(dict(mlp_a.named_parameters()), TrainConfig(steps=4, lr=1e-2, seed=2))
    full.run(loss_a)
    _, mlp_b, loss_b = _toy()
    part = Trainer(dict(mlp_b.named_parameters()), TrainConfig(steps=4, lr=1e-2, seed=2))
    part.run(loss_b, steps=2)
    part.save(tmp_path / "state.safetensors")
    with torch.inference_mode(False):
        _, mlp_c, loss_c = _toy()
    resumed = Trainer(dict(mlp_c.named_parameters()), TrainConfig(steps=4, lr=1e-2, seed=2))
    with torch.inference_mode():
        resumed.load(tmp_path / "state.safetensors")
        resumed.run(loss_c)
    for n, p in mlp_a.named_parameters():
        assert torch.equal(p, dict(mlp_c.named_parameters())[n]), n


def test_checkpoint_every_n_steps_but_not_the_last():
    _, mlp, loss_fn = _toy()
    tr = Trainer(dict(mlp.named_parameters()), TrainConfig(steps=7, seed=0))
    seen = []
    tr.run(loss_fn, checkpoint=lambda: seen.append(tr.step), checkpoint_every=3)
    assert seen == [3, 6]


def test_interrupt_keeps_last_finished_step():
    _, mlp, loss_fn = _toy()
    tr = Trainer(dict(mlp.named_parameters()), TrainConfig(steps=10, seed=0))

    def stop():
        if tr.step == 4:
            raise InterruptedError

    with pytest.raises(InterruptedError):
        tr.run(loss_fn, check_interrupt=stop)
    assert tr.step == 4 and len(tr.losses) == 4


def test_bad_inputs():
    with pytest.raises(ValueError, match="leaf"):
        Trainer({"w": torch.zeros(2)}, TrainConfig())
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=-1)
    w, unused = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    tr = Trainer({"w": w, "unused": unused}, TrainConfig(steps=1))
    with pytest.raises(ValueError, match="'unused' does not affect"):
        tr.run(lambda s, g: (w - 1).pow(2).sum())
    tr2 = Trainer({"w": w}, TrainConfig(steps=1))
    with pytest.raises(ValueError, match="finite"):
        tr2.run(lambda s, g: (w * float("nan")).sum())
