"""What every benchmark in bench/ shares: an in-process ComfyUI on the tiny checkpoint, timing, and a report.

On the CPU (the default) timings are the least *process CPU time* over repeats, with one torch thread by default:
on a shared machine other processes steal cores, which inflates wall time but not the work this process does.
With ``--device cuda`` they are the least wall time, the GPU synchronised before and after each call (kernels run
asynchronously), and each case reports its peak GPU memory (``torch.cuda.max_memory_allocated``) next to it.
``--json PATH`` writes every case (seconds per unit, peak memory, ratio, target) for bench/gpu_suite.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from . import host

_FLAGS = {"size": "image side in pixels (latent = size/8)", "steps": "sampling steps",
          "repeats": "timed repeats (the least time counts)", "threads": "torch CPU threads (1: stable timings)",
          "batch": "latent batch"}


def parse_args(doc: str, argv: list[str] | None = None, **defaults: int) -> argparse.Namespace:
    """The command line of a benchmark: the integer flags named in ``defaults`` (size, steps, repeats, threads,
    batch) with those defaults, ``--device`` and ``--json`` (``add_device_flags``), ``doc``'s first line as the
    description; INFO logging to stderr."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    for name, default in defaults.items():
        ap.add_argument(f"--{name}", type=int, default=default, help=_FLAGS[name])
    add_device_flags(ap)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return args


def add_device_flags(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cpu: least process CPU time (default); cuda: least synchronised wall time + peak VRAM")
    ap.add_argument("--json", default=None, help="also write the cases as JSON here (bench/gpu_suite.py reads it)")


def prompt_inputs(clip, size: int, batch: int = 1):
    """(positive "a photo of a person", negative "", empty latent size x size of ``batch``) for a sampling bench."""
    import torch

    import nodes

    with torch.inference_mode():
        pos = nodes.CLIPTextEncode().encode(clip, "a photo of a person")[0]
        neg = nodes.CLIPTextEncode().encode(clip, "")[0]
        latent = nodes.EmptyLatentImage().generate(size, size, batch)[0]
    return pos, neg, latent


def best_cpu_time(fn: Callable[[], object], repeats: int) -> float:
    """Least CPU time (seconds) of ``repeats`` calls of ``fn``."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def best_time(fn: Callable[[], object], repeats: int, device: str = "cpu") -> float:
    """Least time (seconds) of ``repeats`` calls of ``fn``: process CPU time on the CPU (``best_cpu_time``, as
    before), wall time between two ``torch.cuda.synchronize()`` on CUDA."""
    if device == "cpu":
        return best_cpu_time(fn, repeats)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


class PeakMemory:
    """``with PeakMemory(device) as m: ...``; then ``m.mb`` (MiB): on CUDA the peak GPU memory torch allocated inside
    the block (counters reset on entry); on the CPU the process's peak resident memory so far (``ru_maxrss``: it
    cannot be reset, so it includes everything the process did before)."""

    def __init__(self, device: str):
        self.device, self.mb = device, None

    def __enter__(self):
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            self.mb = torch.cuda.max_memory_allocated() / 2**20
        else:
            import resource

            self.mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        return False


@dataclass
class Case:
    bench: str
    case: str
    seconds: float  # per unit
    unit: str = "step"  # "step", "image", "sample", ...
    peak_mb: float | None = None  # peak GPU memory (CUDA) or the process's peak RSS so far (CPU), MiB
    ratio: float | None = None  # against the bench's baseline case
    target: float | None = None  # ratio <= target, when there is one
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.target is None or (self.ratio is not None and self.ratio <= self.target)


class Report:
    """The cases a bench measured; ``write(path)`` when ``--json`` was given."""

    def __init__(self, bench: str, device: str):
        self.bench, self.device, self.cases = bench, device, []

    def add(self, case: str, seconds: float, **kw) -> Case:
        c = Case(self.bench, case, seconds, **kw)
        self.cases.append(c)
        return c

    def write(self, path: str | None, **meta) -> None:
        if path:
            Path(path).write_text(json.dumps({"bench": self.bench, "device": self.device, "meta": meta,
                                              "cases": [asdict(c) for c in self.cases]}, indent=1))


def setup(threads: int = 1, *, load_checkpoint: bool = True, device: str = "cpu"):
    """Import ComfyUI (on ``device``: the CPU unless "cuda"; throw-away base dir with the tiny checkpoint) and the
    pack; no grad, no progress bars. Returns ``(base, (MODEL, CLIP, VAE))``, the triple None when not asked for."""
    base = Path(tempfile.mkdtemp(prefix="facecond-bench-"))
    host.import_comfy(base, cpu=device == "cpu")
    host.prepare_base(base, pack_dir=None)
    host.load_pack(host.REPO, "facecond")
    import comfy.utils
    import torch

    import nodes

    torch.set_grad_enabled(False)
    torch.set_num_threads(threads)
    comfy.utils.PROGRESS_BAR_ENABLED = False
    models = nodes.CheckpointLoaderSimple().load_checkpoint(host.EXAMPLE_CKPT)[:3] if load_checkpoint else None
    return base, models
