"""Benchmark: the evaluation harness's own overhead per image against the sampling time it wraps.

Runs scripts/evaluate.py (its own headless ComfyUI, the tiny checkpoint, stand-in face models) on real photos
from ../shared/data for 2 identities x 2 prompts x N seeds of Face0's example workflow, then reads runs.jsonl:
per image, the server's execution time (history timestamps: sampling, VAE decode, save) against the
harness's wall time around it (queue, poll, fetch, write, ledger), and the scoring time per image (identity +
CLIP) from summary.json. No asserts: numbers for the report. On a GPU with real weights the sampling time grows
and the overhead stays the same.

--servers 2: the speed-up of spreading the jobs over two local ComfyUI servers (each its own base folder), against
one of them, measured in the same run on the same jobs (a plain txt2img workflow on the tiny checkpoint): the
generation wall time from runs.jsonl (first job's start to last job's end). On one machine the two servers share
its cores: the ratio is what several GPUs (one ComfyUI each) scale, only where each server has its own device.
--cores-per-server 1 pins each server to its own core (and the one-server baseline to one core): the CPU stand-in for
one device per server. Without it the servers share every core and, on a quiet 2-core machine, two are slower than one.
    .host/venv/bin/python -P bench/bench_evaluate.py [--seeds 4] [--size 64] [--steps 2] [--servers 2]
                                                     [--cores-per-server 1]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
log = logging.getLogger("bench_evaluate")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--servers", type=int, default=1, help="2+: the multi-server speed-up instead")
    ap.add_argument("--cores-per-server", type=int, default=0,
                    help="with --servers: pin each server to its own N cores (OMP_NUM_THREADS=N), as each server "
                         "would have its own GPU; 0 (default): all servers share every core")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.servers > 1:
        servers_bench(args)
        return
    from facecond_dev import host
    from facecond_dev.tiny_clip import write_tiny_clip

    data = host.shared_data()
    if data is None:
        raise SystemExit("needs ../shared/data (photos and the insightface test pack)")
    work = Path(tempfile.mkdtemp(prefix="facecond-bench-eval-"))
    for name in ("John_Salley", "John_Savage"):
        (work / "ids" / name).mkdir(parents=True)
        shutil.copyfile(sorted((data / "faces" / "johns" / name).glob("*.jpg"))[0], work / "ids" / name / "a.jpg")
    (work / "prompts.txt").write_text("a photo of {}\n{} as an astronaut\n")
    write_tiny_clip(work / "clip")
    cmd = [sys.executable, "-P", str(ROOT / "scripts" / "evaluate.py"), "--out", str(work / "out"),
           "--identities", str(work / "ids"), "--prompts", str(work / "prompts.txt"), "--seeds", f"0-{args.seeds - 1}",
           "--method", "face0=" + str(ROOT / "example_workflows" / "face0_single_photo.json"), "--stand-ins",
           "--set", f"EmptyLatentImage.width={args.size}", "--set", f"EmptyLatentImage.height={args.size}",
           "--set", f"FacecondThreeWayCFGSampler.steps={args.steps}",
           "--recogniser", str(data / "models" / "insightface_testpack" / "mobilefacenet_128.onnx"),
           "--clip-model", str(work / "clip"), "--no-face", "passthrough"]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    runs = [json.loads(x) for x in (work / "out" / "runs.jsonl").read_text().splitlines()]
    timing = json.loads((work / "out" / "summary.json").read_text())["meta"]["timing"]
    warm = runs[1:] or runs  # the first image pays the model load
    total = [r["seconds_total"] for r in warm]
    sampling = [r["seconds_sampling"] for r in warm]
    over = [t - s for t, s in zip(total, sampling)]
    med = statistics.median
    log.info("%d images (%dx%d, %d steps), first one left out (model load)", len(runs), args.size, args.size,
             args.steps)
    log.info("per image, median: server execution %.3f s | harness wall %.3f s | harness overhead %.3f s (%.0f%%)",
             med(sampling), med(total), med(over), 100 * med(over) / med(total))
    log.info("scoring per image: identity %.3f s, CLIP %.3f s (tiny CLIP; ViT-L/14 on a GPU is ~10 ms)",
             timing["identity_seconds_per_image"], timing["clip_seconds_per_image"])
    shutil.rmtree(work, ignore_errors=True)


def _gen_wall(out: Path) -> tuple[float, int]:
    runs = [json.loads(x) for x in (out / "runs.jsonl").read_text().splitlines()]
    return max(r["finished"] for r in runs) - min(r["finished"] - r["seconds_total"] for r in runs), len(runs)


def servers_bench(args) -> None:
    from facecond_dev import host

    data = host.shared_data()
    work = Path(tempfile.mkdtemp(prefix="facecond-bench-servers-"))
    host.import_comfy(work / "base0")
    if args.cores_per_server:  # each server its own cores, as each would have its own GPU
        os.environ["OMP_NUM_THREADS"] = str(args.cores_per_server)
    servers = [host.ComfyServer(host.prepare_base(work / f"base{i}", ROOT, "facecond-pack.dev"),
                                pack_name="facecond-pack.dev").start() for i in range(args.servers)]
    if args.cores_per_server:
        for i, s in enumerate(servers):
            cores = set(range(i * args.cores_per_server, (i + 1) * args.cores_per_server))
            for tid in os.listdir(f"/proc/{s.proc.pid}/task"):  # every thread; later ones inherit it
                os.sched_setaffinity(int(tid), cores)
    try:
        for name in ("John_Salley", "John_Savage"):
            (work / "ids" / name).mkdir(parents=True)
            shutil.copyfile(sorted((data / "faces" / "johns" / name).glob("*.jpg"))[0], work / "ids" / name / "a.jpg")
        (work / "prompts.txt").write_text("a photo of {}\n{} as an astronaut\n")
        wf = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": host.EXAMPLE_CKPT}},
              "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "{prompt}", "clip": ["1", 1]}},
              "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
              "4": {"class_type": "EmptyLatentImage", "inputs": {"width": args.size, "height": args.size,
                                                                  "batch_size": 1}},
              "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                         "latent_image": ["4", 0], "seed": 0, "steps": args.steps,
                                                         "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
                                                         "denoise": 1.0}},
              "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
              "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "bench"}}}
        (work / "plain.json").write_text(json.dumps(wf))
        walls = {}
        # warm-up: one image on every server (model load), so both timed runs start from warm servers
        for n, urls, seeds in (("warm", servers, "1000"), (1, servers[:1], f"0-{args.seeds - 1}"),
                               (args.servers, servers, f"0-{args.seeds - 1}")):
            cmd = [sys.executable, "-P", str(ROOT / "scripts" / "evaluate.py"), "--out", str(work / f"out{n}"),
                   "--identities", str(work / "ids"), "--prompts", str(work / "prompts.txt"), "--seeds",
                   seeds, "--method", f"plain={work / 'plain.json'}",
                   *[x for s in urls for x in ("--url", s.url)],
                   "--recogniser", str(data / "models" / "insightface_testpack" / "mobilefacenet_128.onnx"),
                   "--independent-recogniser", "none", "--no-face", "passthrough"]
            proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(proc.stderr[-3000:])
            if n != "warm":
                walls[n] = _gen_wall(work / f"out{n}")
        (w1, k), (wn, _) = walls[1], walls[args.servers]
        log.info("%d images (%dx%d, %d steps): 1 server %.1f s, %d servers %.1f s: speed-up %.2fx", k, args.size,
                 args.size, args.steps, w1, args.servers, wn, w1 / wn)
    finally:
        for s in servers:
            s.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
