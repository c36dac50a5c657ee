"""Benchmark: sampling with the IP-Adapter attention patch vs without, seconds per step, in one run.

Runs in one process on the tiny SD1.5 checkpoint (forced to the CPU, as the tests are) with a random
FaceID IP-Adapter of the real layout (512-d input, 4 image tokens, one W'_k/W'_v pair per cross-attention):
KSampler on the unpatched model; on the model patched with weight 0.8 over the whole schedule (target ratio
<= 1.15); and patched with a start/end window that no sampled step falls into (target <= 1.01); a plain clone is
the control. Each figure is the least time over ``--repeats`` interleaved runs, each timed after one untimed run
of the same model (ComfyUI swaps the loaded clone on the first call, a one-off cost that is not per step);
process CPU time, one torch thread by default (``--device cuda``: synchronised wall time on the GPU and each
case's peak VRAM). Usage:

    .host/venv/bin/python -P bench/bench_ipadapter.py [--size 128] [--steps 4] [--repeats 7] [--threads 1] \
        [--device cpu|cuda] [--json out.json]
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from facecond_dev.bench import PeakMemory, Report, best_time, parse_args, prompt_inputs, setup  # noqa: E402

log = logging.getLogger("bench_ipadapter")


def main() -> None:
    args = parse_args(__doc__, size=128, steps=4, repeats=7, threads=1, batch=1)
    dev = args.device
    _, (model, clip, _) = setup(args.threads, device=dev)

    import comfy.model_management
    import torch

    import nodes
    from facecond.nodes.ipadapter.adapter import ApplyIPAdapter, cross_attention_layers
    from facecond.py.ipadapter import adapter as ipa
    from facecond.py.ipadapter import aggregate as agg
    from facecond_dev.random_weights import random_state_dict

    layers = cross_attention_layers(model)
    adapter = ipa.from_state_dict(random_state_dict("faceid", 512, [d for _, d, _ in layers], layers[0][2]), "b")
    embeds = agg.RefEmbeds(torch.nn.functional.normalize(torch.randn(1, 512), dim=-1), "face", "bench", (0,))

    pos, neg, latent = prompt_inputs(clip, args.size, args.batch)
    with torch.inference_mode():
        active = ApplyIPAdapter().apply(model, adapter, embeds, 0.8, 0.0, 1.0)[0]
        outside = ApplyIPAdapter().apply(model, adapter, embeds, 0.8, 1.0, 1.0)[0]  # window: sigma = 0 only

        def run(m):
            return lambda: nodes.KSampler().sample(m, 1, args.steps, 7.5, "euler", "normal", pos, neg, latent)

        target_dev = comfy.model_management.get_torch_device()
        x = torch.randn(2 * args.batch, 4, args.size // 8, args.size // 8).to(target_dev)
        ctx = torch.cat([pos[0][0], neg[0][0]]).repeat_interleave(args.batch, 0).to(target_dev)
        sigma = torch.full((2 * args.batch,), 5.0).to(target_dev)

        def step(m):
            """One denoiser evaluation, cond + uncond batched, as calc_cond_batch makes it: the work of a step."""
            def fn():
                if dev == "cuda":  # the weights on the GPU (a no-op once loaded; the CPU timings stay as they were)
                    comfy.model_management.load_models_gpu([m])
                to = dict(m.model_options.get("transformer_options", {}), sigmas=sigma, cond_or_uncond=[0, 1])
                for _ in range(args.steps):
                    m.model.apply_model(x, sigma, c_crossattn=ctx, transformer_options=to)
            return fn

        models = {"no patch": model, "clone, no patch": model.clone(), "IP-Adapter w=0.8": active,
                  "IP-Adapter outside window": outside}
        cases = {(how, name): (run(m) if how == "KSampler" else step(m)) for how in ("KSampler", "model call")
                 for name, m in models.items()}
        for fn in cases.values():  # warm-up (model load, allocator, K'/V' caches)
            fn()
        best = dict.fromkeys(cases, float("inf"))
        for _ in range(args.repeats):  # interleaved, so drifts in machine load hit all cases alike
            for key, fn in cases.items():
                fn()  # untimed: ComfyUI swaps the loaded ModelPatcher (clone) on the first call after another one
                best[key] = min(best[key], best_time(fn, 1, dev))
        peaks = {}
        for key, fn in cases.items():
            with PeakMemory(dev) as mem:
                fn()
            peaks[key] = mem.mb
    log.info("tiny SD1.5 checkpoint (%d cross-attentions), %dx%d, batch %d, %d euler steps, cfg 7.5, best of %d, "
             "%s, torch threads %d", len(layers), args.size, args.size, args.batch, args.steps, args.repeats,
             dev, torch.get_num_threads())
    report = Report("ipadapter", dev)
    targets = {"clone, no patch": 1.01, "IP-Adapter w=0.8": 1.15, "IP-Adapter outside window": 1.01}
    for how in ("KSampler", "model call"):
        k = best[(how, "no patch")] / args.steps
        log.info("%s: %-26s %10.5f s/step", how, "no patch", k)
        report.add(f"{how}: no patch", k, peak_mb=peaks[(how, "no patch")])
        for name, target in targets.items():
            ratio = best[(how, name)] / args.steps / k
            log.info("%s: %-26s %10.5f s/step  ratio %.3f  (target <= %.2f: %s)", how, name,
                     best[(how, name)] / args.steps, ratio, target, "ok" if ratio <= target else "OVER")
            report.add(f"{how}: {name}", best[(how, name)] / args.steps, ratio=ratio, target=target,
                       peak_mb=peaks[(how, name)])
    report.write(args.json, size=args.size, steps=args.steps, batch=args.batch, repeats=args.repeats)


if __name__ == "__main__":
    main()
