"""Face0 training presets (py/train/face0_train.py PRESETS, scripts/face0_train.py --preset), gradient accumulation
and the EMA, against the paper's numbers (Face0 §2.3: lr 2e-5, batch 256, 500K steps, EMA 0.9999, ~10M-parameter
projection) and hand-computed parameter counts."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from facecond.py.face0.projection import PRESETS as PROJ_PRESETS
from facecond.py.face0.projection import ProjectionInfo, parameter_count, random_projection
from facecond.py.train import face0_train as ft
from facecond_dev import host

ROOT = Path(__file__).resolve().parents[3]


def _cli():
    spec = importlib.util.spec_from_file_location("face0_train_cli", ROOT / "scripts" / "face0_train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("face0_train_cli", module)
    spec.loader.exec_module(module)
    return module


def test_projection_presets_have_the_hand_computed_sizes():
    # small (the paper's stated width 768), D = 512: 512·768+768 + 2·(768·768+768) + 768·2304+2304
    #   = 393,984 + 1,181,184 + 1,771,776 = 3,346,944
    # paper (width 1536), D = 512: 513·1536 + 2·1537·1536 + 1537·2304 = 787,968 + 4,721,664 + 3,541,248 = 9,050,880
    #                    D = 1792 (Inception-ResNet-V1 without its last layer): 2,754,048 + 4,721,664 + 3,541,248
    for preset, d, expected in (("small", 512, 3_346_944), ("paper", 512, 9_050_880), ("paper", 1792, 11_016_960)):
        info = ProjectionInfo(embedder="e", embed_dim=d, **PROJ_PRESETS[preset])
        assert info.parameters == expected == parameter_count(d, **PROJ_PRESETS[preset])
        assert sum(p.numel() for p in random_projection(info).parameters()) == expected
    assert 9e6 <= parameter_count(512, **PROJ_PRESETS["paper"]) <= 11.1e6  # the paper's "~10M"
    # the paper's literal width 768 stays far from 10M at either embedding width
    assert parameter_count(1792, 768, 4) == 4_329_984


def test_presets_expand_to_the_papers_hyperparameters():
    paper = ft.expand_preset("paper")
    assert paper == {"steps": 500_000, "batch": 4, "accum": 64, "global_batch": 256, "lr": 2e-5, "ema_decay": 0.9999,
                     "face_drop": 0.1, "proj_hidden": 1536, "proj_depth": 4}
    # the global batch stays 256: accumulation shrinks as the micro-batch or the process count grows
    assert ft.expand_preset("paper", processes=8, batch=8)["accum"] == 4
    assert ft.expand_preset("paper", processes=64, batch=4)["accum"] == 1
    with pytest.raises(ValueError, match="global batch of 256"):
        ft.expand_preset("paper", processes=3)
    small = ft.expand_preset("small")
    assert small == {"steps": 10_000, "batch": 4, "accum": 1, "global_batch": 4, "lr": 2e-5, "ema_decay": 0.9999,
                     "face_drop": 0.1, "proj_hidden": 768, "proj_depth": 4}
    # explicit values win; None means "not given"
    assert ft.expand_preset("paper", steps=10, accum=2, lr=None)["steps"] == 10
    assert ft.expand_preset("paper", steps=10, accum=2)["global_batch"] == 8
    with pytest.raises(ValueError, match="unknown preset"):
        ft.expand_preset("huge")


def test_cli_preset_flags_build_the_training_config():
    cli = _cli()
    base = ["--checkpoint", "c", "--shards", "s", "--out", "o"]
    cfg, run = cli.config_from_args(cli.parse_args([*base, "--preset", "paper"]), 2)
    assert (cfg.steps, cfg.batch, cfg.accum, cfg.lr) == (500_000, 4, 32, 2e-5)
    assert (cfg.ema_decay, cfg.face_drop) == (0.9999, 0.1)
    assert (cfg.proj_hidden, cfg.proj_depth, run["global_batch"]) == (1536, 4, 256)
    cfg, run = cli.config_from_args(cli.parse_args(base), 1)  # the default stays the small run
    assert (cfg.steps, cfg.batch, cfg.accum, cfg.proj_hidden, run["global_batch"]) == (10_000, 4, 1, 768, 4)
    cfg, _ = cli.config_from_args(cli.parse_args([*base, "--preset", "paper", "--batch", "16", "--proj-hidden", "64",
                                                  "--proj-depth", "3"]), 1)
    assert (cfg.batch, cfg.accum, cfg.proj_hidden, cfg.proj_depth) == (16, 16, 64, 3)


def _fresh_model():
    import comfy.sd

    base = comfy.sd.load_checkpoint_guess_config(str(host.tiny_checkpoint_path()), output_clip=False, output_vae=False,
                                                 model_options={"dtype": torch.float32})[0].model
    proj = random_projection(ProjectionInfo("test/e", 16, hidden=32, depth=3), seed=0)
    return ft.Face0Model(proj, base, ft.Face0TrainConfig(mode="full", batch=8))


def test_gradient_accumulation_equals_one_big_batch(comfy_base, one_torch_thread):
    model = _fresh_model()
    params = model.trainable()
    start = {n: p.detach().clone() for n, p in params.items()}
    g = torch.Generator().manual_seed(0)
    x0, ctx, emb = torch.randn(8, 4, 8, 8, generator=g), torch.randn(8, 77, 768, generator=g), torch.randn(8, 16)
    sigma, noise, drop = ft.draw(x0, model.base.model_sampling.sigmas, ft.step_generator(0, 0), 0.5)
    assert 0 < int(drop.sum()) < 8  # some rows without a face: the dropout path is in both runs

    def one_step(accum: int) -> tuple[float, dict, dict]:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(start[n])
        opt = torch.optim.AdamW(list(params.values()), lr=1e-3)
        rows = 8 // accum

        def micro(i):
            s = slice(i * rows, (i + 1) * rows)
            return ft.drawn_loss(model, x0[s], ctx[s], emb[s], sigma[s], noise[s], drop[s])

        loss = ft.accumulate(micro, accum)
        grads = {n: p.grad.clone() for n, p in params.items()}
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss, grads, {n: p.detach().clone() for n, p in params.items()}

    big_loss, big_g, big_p = one_step(1)
    acc_loss, acc_g, acc_p = one_step(4)
    assert acc_loss == pytest.approx(big_loss, rel=1e-5)
    scale = max(float(v.abs().max()) for v in big_g.values())
    assert scale > 0
    for n in big_g:
        torch.testing.assert_close(acc_g[n], big_g[n], rtol=1e-4, atol=1e-6 * scale)
    moved = max(float((big_p[n] - start[n]).abs().max()) for n in big_p)
    assert moved > 5e-4  # AdamW moved the weights by about lr
    # Adam's first step is about -lr·g/(|g| + eps): where |g| is near eps, float rounding of the summed gradient
    # shows; everywhere else the two updates agree to 0.1% of the step
    for n in big_p:
        clear = big_g[n].abs() > 1e-4 * scale
        d = (acc_p[n] - big_p[n])[clear].abs()
        assert d.numel() == 0 or float(d.max()) < 1e-3 * moved, n
    diff = max(float((acc_p[n] - big_p[n]).abs().max()) for n in big_p)
    assert diff < 2e-2 * moved, (diff, moved)
    # the projection is trained too (its gradient is part of the comparison)
    assert any(n.startswith("proj.") for n in big_g)


def test_ema_uses_the_papers_decay():
    p = {"w": torch.tensor([1.0, -2.0])}
    ema = ft.EMA(p, 0.9999)
    p["w"] = torch.tensor([3.0, 0.0])
    ema.update(p, step=1_000_000)  # past the warm-up: exactly the paper's 0.9999
    torch.testing.assert_close(ema.shadow["w"], torch.tensor([1.0 * 0.9999 + 3.0 * 0.0001, -2.0 * 0.9999]))
    ema2 = ft.EMA({"w": torch.zeros(1)}, 0.9999)
    ema2.update({"w": torch.ones(1)}, step=10)  # warm-up: d = (1+10)/(10+10) = 0.55
    torch.testing.assert_close(ema2.shadow["w"], torch.tensor([0.45]))
    ema3 = ft.EMA({"w": torch.zeros(1)}, 0.9999)
    ema3.update({"w": torch.ones(1)}, step=89_990)  # (89,991)/(90,000) = 0.9999: the warm-up ends here
    torch.testing.assert_close(ema3.shadow["w"], torch.tensor([1e-4]), rtol=1e-6, atol=0)
    assert ft.expand_preset("paper")["ema_decay"] == ft.Face0TrainConfig().ema_decay == 0.9999
