"""Benchmark: one Celeb Basis training step (forward + backward through the frozen CLIP text encoder and UNet,
Adam on the coefficient MLP) next to one plain sampling step (KSampler, cfg 7, 2 branches) on the same model.

Runs in one process on the tiny SD1.5 checkpoint (CPU, as the tests). Prints seconds per step (least CPU time
over ``--repeats``) and peak resident memory; a face textual-inversion step (K = 2 vectors, log-norm) next to
them. Usage:

    .host/venv/bin/python -P bench/bench_celebbasis.py [--size 64] [--repeats 3] [--threads 1]
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
from facecond_dev.bench import best_cpu_time, parse_args  # noqa: E402

log = logging.getLogger("bench_celebbasis")


def main() -> None:
    args = parse_args(__doc__, size=64, repeats=3, threads=1)
    base = Path(tempfile.mkdtemp(prefix="facecond-bench-"))
    host.import_comfy(base)
    host.prepare_base(base, pack_dir=None)
    host.load_pack(ROOT, "facecond")
    import torch

    import nodes
    from facecond.nodes.celebbasis import basis_for
    from facecond.nodes.pseudo_words import text_encoder
    from facecond.nodes.training import encode_images, encode_with, model_denoiser, template_tokens
    from facecond.py.celebbasis import basis as cb
    from facecond.py.celebbasis.coeffs import new_mlp
    from facecond.py.celebbasis.inversion import TIVectors, init_vectors
    from facecond.py.train.core import TrainConfig, Trainer, denoising_loss, sample_noise, sample_sigmas

    torch.set_num_threads(args.threads)
    model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(host.EXAMPLE_CKPT)[:3]
    basis, _ = basis_for(clip, cb.load_names(), cb.DEFAULT_P, "bench")
    denoise, sigmas, _ = model_denoiser(model, "bench")
    x0 = encode_images(vae, model, torch.rand(1, args.size, args.size, 3))
    tokens = template_tokens(clip, ["a photo of {}"], "bench")[0]
    mlp = new_mlp(512, basis, 0)
    face = torch.nn.functional.normalize(torch.randn(1, 512), dim=-1)

    def loss_fn(step, g):
        sigma, _ = sample_sigmas(sigmas, 1, g)
        return denoising_loss(denoise, x0, encode_with(clip, tokens, basis.embeddings(mlp(face)[0])), sigma,
                              sample_noise(x0, g))

    trainer = Trainer(dict(mlp.named_parameters()), TrainConfig(steps=10 ** 6))
    train_s = best_cpu_time(lambda: trainer.run(loss_fn, steps=trainer.step + 1), args.repeats)
    peak_cb_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    enc = text_encoder(clip, "bench")
    ti = TIVectors(init_vectors("face", enc.table(), enc.tokenize, 2)[0], "log_norm_e")

    def ti_loss(step, g):
        sigma, _ = sample_sigmas(sigmas, 1, g)
        return denoising_loss(denoise, x0, encode_with(clip, tokens, ti.vectors(), "bench"), sigma,
                              sample_noise(x0, g))

    ti_trainer = Trainer(ti.params, TrainConfig(steps=10 ** 6, betas=(0.9, 0.98)))
    ti_s = best_cpu_time(lambda: ti_trainer.run(ti_loss, steps=ti_trainer.step + 1), args.repeats)
    pos = nodes.CLIPTextEncode().encode(clip, "a photo of a person")[0]
    neg = nodes.CLIPTextEncode().encode(clip, "")[0]
    latent = nodes.EmptyLatentImage().generate(args.size, args.size, 1)[0]
    sample_s = best_cpu_time(lambda: nodes.common_ksampler(model, 0, 1, 7.0, "euler", "normal", pos, neg, latent,
                                                   denoise=1.0, disable_noise=False), args.repeats)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    log.info("tiny SD1.5, %dx%d, %d thread(s), p=%d", args.size, args.size, args.threads, basis.p)
    log.info("  plain sampling step (KSampler, cfg 7): %.3f s", sample_s)
    log.info("  Celeb Basis training step:              %.3f s  (%.1fx a sampling step)", train_s, train_s / sample_s)
    log.info("  Face TI training step (K=2, log-norm):  %.3f s  (%.1fx a sampling step)", ti_s, ti_s / sample_s)
    log.info("  peak resident memory after Celeb Basis steps: %.0f MB; at the end (TI, sampling): %.0f MB",
             peak_cb_mb, peak_mb)


if __name__ == "__main__":
    main()
