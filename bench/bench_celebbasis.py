"""Benchmark: one Celeb Basis training step (forward + backward through the frozen CLIP text encoder and UNet,
Adam on the coefficient MLP) next to one plain sampling step (KSampler, cfg 7, 2 branches) on the same model.

Runs in one process on the tiny SD1.5 checkpoint (CPU, as the tests). Prints seconds per step (least CPU time
over ``--repeats``) and peak resident memory; a face textual-inversion step (K = 2 vectors, log-norm) next to
them. ``--device cuda``: synchronised wall time on the GPU and each case's peak VRAM. Usage:

    .host/venv/bin/python -P bench/bench_celebbasis.py [--size 64] [--repeats 3] [--threads 1] [--device cpu|cuda]
"""

from __future__ import annotations

import logging
import resource
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from facecond_dev import host  # noqa: E402
from facecond_dev.bench import PeakMemory, Report, best_time, parse_args  # noqa: E402

log = logging.getLogger("bench_celebbasis")


def main() -> None:
    args = parse_args(__doc__, size=64, repeats=3, threads=1)
    dev = args.device
    base = Path(tempfile.mkdtemp(prefix="facecond-bench-"))
    host.import_comfy(base, cpu=dev == "cpu")
    host.prepare_base(base, pack_dir=None)
    host.load_pack(ROOT, "facecond")
    import torch

    import nodes
    from facecond.nodes.celebbasis.basis import basis_for
    from facecond.nodes.celebbasis.pseudo_words import text_encoder
    from facecond.nodes.celebbasis.training import encode_images, encode_with, model_denoiser, template_tokens
    from facecond.py.celebbasis import basis as cb
    from facecond.py.celebbasis.coeffs import new_mlp
    from facecond.py.celebbasis.inversion import TIVectors, init_vectors
    from facecond.py.train.core import TrainConfig, Trainer, denoising_loss, sample_noise, sample_sigmas

    torch.set_num_threads(args.threads)
    model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(host.EXAMPLE_CKPT)[:3]
    basis, _ = basis_for(clip, cb.load_names(), cb.DEFAULT_P, "bench")
    denoise, sigmas, device = model_denoiser(model, "bench")
    x0 = encode_images(vae, model, torch.rand(1, args.size, args.size, 3)).to(device)
    tokens = template_tokens(clip, ["a photo of {}"], "bench")[0]
    mlp = new_mlp(512, basis, 0).to(device)  # as py/celebbasis/train.py: the trained module on the model's device
    face = torch.nn.functional.normalize(torch.randn(1, 512), dim=-1).to(device)

    def loss_fn(step, g):
        sigma, _ = sample_sigmas(sigmas, 1, g)
        ctx = encode_with(clip, tokens, basis.embeddings(mlp(face)[0])).to(device)
        return denoising_loss(denoise, x0, ctx, sigma, sample_noise(x0, g))

    trainer = Trainer(dict(mlp.named_parameters()), TrainConfig(steps=10 ** 6))
    with PeakMemory(dev) as mem_cb:
        train_s = best_time(lambda: trainer.run(loss_fn, steps=trainer.step + 1), args.repeats, dev)
    peak_cb_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    enc = text_encoder(clip, "bench")
    ti = TIVectors(init_vectors("face", enc.table(), enc.tokenize, 2)[0].to(device), "log_norm_e")

    def ti_loss(step, g):
        sigma, _ = sample_sigmas(sigmas, 1, g)
        ctx = encode_with(clip, tokens, ti.vectors(), "bench").to(device)
        return denoising_loss(denoise, x0, ctx, sigma, sample_noise(x0, g))

    ti_trainer = Trainer(ti.params, TrainConfig(steps=10 ** 6, betas=(0.9, 0.98)))
    with PeakMemory(dev) as mem_ti:
        ti_s = best_time(lambda: ti_trainer.run(ti_loss, steps=ti_trainer.step + 1), args.repeats, dev)
    pos = nodes.CLIPTextEncode().encode(clip, "a photo of a person")[0]
    neg = nodes.CLIPTextEncode().encode(clip, "")[0]
    latent = nodes.EmptyLatentImage().generate(args.size, args.size, 1)[0]
    with PeakMemory(dev) as mem_s:
        sample_s = best_time(lambda: nodes.common_ksampler(model, 0, 1, 7.0, "euler", "normal", pos, neg, latent,
                                                           denoise=1.0, disable_noise=False), args.repeats, dev)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    log.info("tiny SD1.5, %dx%d, %d thread(s), p=%d, %s", args.size, args.size, args.threads, basis.p, dev)
    log.info("  plain sampling step (KSampler, cfg 7): %.3f s", sample_s)
    log.info("  Celeb Basis training step:              %.3f s  (%.1fx a sampling step)", train_s, train_s / sample_s)
    log.info("  Face TI training step (K=2, log-norm):  %.3f s  (%.1fx a sampling step)", ti_s, ti_s / sample_s)
    log.info("  peak resident memory after Celeb Basis steps: %.0f MB; at the end (TI, sampling): %.0f MB",
             peak_cb_mb, peak_mb)
    report = Report("celebbasis", dev)
    report.add("sampling step (KSampler, cfg 7)", sample_s, peak_mb=mem_s.mb)
    report.add("Celeb Basis training step", train_s, ratio=train_s / sample_s, peak_mb=mem_cb.mb)
    report.add("Face TI training step (K=2)", ti_s, ratio=ti_s / sample_s, peak_mb=mem_ti.mb)
    report.write(args.json, size=args.size, repeats=args.repeats)


if __name__ == "__main__":
    main()
