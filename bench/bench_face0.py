"""Benchmark: Face0 three-way guidance vs ComfyUI's KSampler, and the cost of ProjectToContext.

Runs in one process on the tiny SD1.5 checkpoint (forced to the CPU, as the tests are):
seconds per sampling step of KSampler and of ThreeWayCFGSampler with c = 1 (2 branches, target ratio <= 1.02),
one zero weight (3 branches, target <= 1.03 x 1.5) and all branches (4, target <= 1.03 x 2.0). Each figure is
the least CPU time over ``--repeats`` interleaved runs, with one torch thread by default; with ``--device cuda``
the least synchronised wall time on the GPU, with each case's peak VRAM. Usage:

    .host/venv/bin/python -P bench/bench_face0.py [--size 128] [--steps 4] [--repeats 7] [--threads 1] \
        [--device cpu|cuda] [--json out.json]
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from facecond_dev.bench import PeakMemory, Report, best_time, parse_args, prompt_inputs, setup  # noqa: E402

log = logging.getLogger("bench_face0")


def main() -> None:
    args = parse_args(__doc__, size=128, steps=4, repeats=7, threads=1, batch=1)
    dev = args.device
    _, (model, clip, _) = setup(args.threads, device=dev)

    import torch

    import nodes
    from facecond.nodes.face0.guidance import ThreeWayCFGSampler
    from facecond.nodes.face0.projection import ProjectToContext
    from facecond.py.face0.projection import ProjectionInfo, face_tokens, override_tokens, random_projection
    from facecond.py.faces.types import FaceEmbeds

    proj = random_projection(ProjectionInfo(embedder="bench", embed_dim=512), seed=0)
    fe = FaceEmbeds(torch.nn.functional.normalize(torch.randn(args.batch, 512), dim=-1), "bench", True,
                    tuple(range(args.batch)))
    text, empty, latent = prompt_inputs(clip, args.size, args.batch)
    with torch.inference_mode():
        pos, text_only, face_only, neg = ProjectToContext().project(text, fe, proj, clip, "each", empty)

        def ksampler():
            nodes.KSampler().sample(model, 1, args.steps, 7.5, "euler", "normal", pos, neg, latent)

        def three_way(c, a):
            return lambda: ThreeWayCFGSampler().sample(model, 1, args.steps, 7.5, c, a, "euler", "normal", pos,
                                                       text_only, face_only, neg, latent)

        ksampler()  # warm-up (model load, allocator)
        three_way(0.4, 0.5)()
        # interleave the configurations so drifts in machine load hit all of them alike
        cases = {"KSampler": ksampler, "c=1 (2 branches)": three_way(1.0, 0.5),
                 "a=0 (3 branches)": three_way(0.5, 0.0), "all (4 branches)": three_way(0.4, 0.5)}
        best = dict.fromkeys(cases, float("inf"))
        for _ in range(args.repeats):
            for name, fn in cases.items():
                best[name] = min(best[name], best_time(fn, 1, dev))
        per_step = {k: v / args.steps for k, v in best.items()}
        peaks = {}
        for name, fn in cases.items():
            with PeakMemory(dev) as mem:
                fn()
            peaks[name] = mem.mb

        proj_node = best_time(lambda: ProjectToContext().project(text, fe, proj, clip, "each", empty), 20, dev)
        proj_node_clip = best_time(lambda: ProjectToContext().project(text, fe, proj, clip, "each"), 5, dev)
        proj_only = best_time(lambda: override_tokens(text[0][0], face_tokens(proj, fe.embeds), "each"), 50, dev)

    k = per_step["KSampler"]
    log.info("tiny SD1.5 checkpoint, %dx%d, batch %d, %d euler steps, best %s time of %d, torch threads %d",
             args.size, args.size, args.batch, args.steps, "CPU" if dev == "cpu" else "CUDA wall", args.repeats,
             torch.get_num_threads())
    report = Report("face0", dev)
    report.add("KSampler", k, peak_mb=peaks["KSampler"])
    targets = {"c=1 (2 branches)": 1.02, "a=0 (3 branches)": 1.03 * 1.5, "all (4 branches)": 1.03 * 2.0}
    log.info("%-20s %10.4f s/step", "KSampler", k)
    for name, target in targets.items():
        ratio = per_step[name] / k
        log.info("%-20s %10.4f s/step  ratio %.3f  (target <= %.3f: %s)", name, per_step[name], ratio, target,
                 "ok" if ratio <= target else "OVER")
        report.add(f"ThreeWayCFG {name}", per_step[name], ratio=ratio, target=target, peak_mb=peaks[name])
    log.info("ProjectToContext: %.2f ms with empty_conditioning given, %.2f ms encoding \"\" with clip; "
             "projection + token override alone %.3f ms (%.2f%% of one KSampler step)",
             proj_node * 1e3, proj_node_clip * 1e3, proj_only * 1e3, 100 * proj_only / k)
    report.add("ProjectToContext", proj_node, unit="call", ratio=proj_node / k, note="ratio: to one KSampler step")
    report.write(args.json, size=args.size, steps=args.steps, batch=args.batch, repeats=args.repeats)


if __name__ == "__main__":
    main()
