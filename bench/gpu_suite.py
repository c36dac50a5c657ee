"""Every benchmark on one device, one table: absolute seconds per unit and peak memory beside the ratios and targets.

Runs each bench in its own process (``--device DEV --json FILE``), reads the cases back, prints one table and
exits 1 if a bench failed, a ratio missed its target or (``--budget``) the whole suite took too long. The cases:
KSampler vs ThreeWayCFGSampler at c = 1 and with all branches (bench_face0), IP-Adapter on/off (bench_ipadapter),
face detect + embed per image (bench_faces), a Celeb Basis and a face TI step (bench_celebbasis) and the Face0
trainer's samples/s (bench_face0_train). Everything runs on the tiny random checkpoint and weights the benches
generate; ../shared/data (real photos, the insightface test pack) is used where present.

    python -P bench/gpu_suite.py --device cuda              # bench/gpu.sh prepares the environment and runs this
    python -P bench/gpu_suite.py --device cpu --fast        # the CPU dry run (small sizes, one repeat)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# name -> (script, arguments on the GPU, arguments of the fast CPU dry run)
BENCHES: dict[str, tuple[str, list[str], list[str]]] = {
    "face0": ("bench_face0.py", ["--size", "512", "--steps", "8", "--repeats", "5"],
              ["--size", "64", "--steps", "1", "--repeats", "1"]),
    "ipadapter": ("bench_ipadapter.py", ["--size", "512", "--steps", "8", "--repeats", "5"],
                  ["--size", "64", "--steps", "1", "--repeats", "1"]),
    "faces": ("bench_faces.py", ["--repeats", "5"], ["--repeats", "1"]),
    "celebbasis": ("bench_celebbasis.py", ["--size", "512", "--repeats", "5"], ["--size", "64", "--repeats", "1"]),
    "face0_train": ("bench_face0_train.py", ["--repeats", "10"], ["--repeats", "1"]),
}


def run_bench(name: str, device: str, fast: bool, out: Path, timeout: float) -> tuple[dict | None, str, float]:
    """(the bench's JSON or None, the tail of its output, seconds) for one bench run in a subprocess."""
    script, full, quick = BENCHES[name]
    path = out / f"{name}.json"
    cmd = [sys.executable, "-P", str(ROOT / "bench" / script), *(quick if fast else full), "--device", device,
           "--json", str(path)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1" if device == "cpu" else
               os.environ.get("OMP_NUM_THREADS", "4"))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
        tail, ok = (proc.stdout + proc.stderr)[-3000:], proc.returncode == 0
    except subprocess.TimeoutExpired as e:
        tail, ok = f"timed out after {timeout:.0f} s\n{(e.stderr or b'')[-2000:]!r}", False
    seconds = time.perf_counter() - t0
    return (json.loads(path.read_text()) if ok and path.is_file() else None), tail, seconds


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(results: dict[str, dict | None], device: str) -> tuple[str, list[str]]:
    """The table's text and the list of problems (failed benches, missed targets)."""
    mem = "peak VRAM MiB" if device == "cuda" else "peak RSS MiB"  # CPU: the bench process's peak so far
    head = f"{'bench':<12} {'case':<58} {'s/unit':>10} {'unit':<7} {mem:>13} {'ratio':>7} {'target':>7}  ok"
    lines, problems = [head, "-" * len(head)], []
    for name, res in results.items():
        if res is None:
            lines.append(f"{name:<12} {'(failed: see its output above)':<58}")
            problems.append(f"{name}: the bench failed")
            continue
        for c in res["cases"]:
            ok = c["target"] is None or (c["ratio"] is not None and c["ratio"] <= c["target"])
            lines.append(f"{name:<12} {c['case'][:58]:<58} {c['seconds']:>10.5f} {c['unit']:<7} "
                         f"{fmt(c['peak_mb'], '13.1f'):>13} {fmt(c['ratio'], '7.3f'):>7} "
                         f"{fmt(c['target'], '7.3f'):>7}  {'ok' if ok else 'MISS'}")
            if not ok:
                problems.append(f"{name}: {c['case']}: ratio {c['ratio']:.3f} > target {c['target']:.3f}")
    return "\n".join(lines), problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when torch sees one")
    ap.add_argument("--fast", action="store_true", help="small sizes and one repeat (the CPU dry run)")
    ap.add_argument("--only", default=",".join(BENCHES), help="comma list of benches (default: all)")
    ap.add_argument("--budget", type=float, default=300.0, help="seconds the whole suite may take (0: no limit)")
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds one bench may take")
    ap.add_argument("--out", default=None, help="folder for the benches' JSON and summary.json (default: a temp dir)")
    args = ap.parse_args(argv)
    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("gpu_suite: --device cuda but torch sees no CUDA device", file=sys.stderr)
            return 2
        print(f"gpu_suite: {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    names = [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        print(f"gpu_suite: unknown bench(es) {unknown}; known: {', '.join(BENCHES)}", file=sys.stderr)
        return 2
    out = Path(args.out or tempfile.mkdtemp(prefix="facecond-gpu-suite-"))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results, seconds = {}, {}
    for name in names:
        res, tail, sec = run_bench(name, device, args.fast, out, args.timeout)
        results[name], seconds[name] = res, sec
        print(f"--- {name} ({sec:.1f} s) ---\n{tail.strip()}\n", flush=True)
    total = time.perf_counter() - t0
    text, problems = table(results, device)
    if args.budget and total > args.budget:
        problems.append(f"the suite took {total:.0f} s, over its budget of {args.budget:.0f} s")
    print(text)
    each = ", ".join(f"{n} {s:.0f} s" for n, s in seconds.items())
    print(f"\n{len(names)} benches on {device} in {total:.1f} s ({each})")
    (out / "summary.json").write_text(json.dumps({"device": device, "fast": args.fast, "seconds": total,
                                                  "bench_seconds": seconds, "results": results,
                                                  "problems": problems}, indent=1))
    for p in problems:
        print(f"MISS: {p}")
    print(f"results: {out / 'summary.json'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
