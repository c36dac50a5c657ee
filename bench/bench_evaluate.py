"""Benchmark: the evaluation harness's own overhead per image against the sampling time it wraps.

Runs scripts/evaluate.py (its own headless ComfyUI, the tiny checkpoint, stand-in face models) on real photos
from ../shared/data for 2 identities x 2 prompts x N seeds of Face0's example workflow, then reads runs.jsonl:
per image, the server's execution time (history timestamps: sampling, VAE decode, save) against the
harness's wall time around it (queue, poll, fetch, write, ledger), and the scoring time per image (identity +
CLIP) from summary.json. No asserts: numbers for the report. On a GPU with real weights the sampling time grows
and the overhead stays the same.
    .host/venv/bin/python -P bench/bench_evaluate.py [--seeds 4] [--size 64] [--steps 2]
"""

from __future__ import annotations

import argparse
import json
import logging
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
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
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


if __name__ == "__main__":
    main()
