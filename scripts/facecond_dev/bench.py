"""What every benchmark in bench/ shares: an in-process ComfyUI on the tiny checkpoint, and CPU timing.

Timings are the least *process CPU time* over repeats, with one torch thread by default: on a shared
machine other processes steal cores, which inflates wall time but not the work this process does.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from . import host

_FLAGS = {"size": "image side in pixels (latent = size/8)", "steps": "sampling steps",
          "repeats": "timed repeats (the least time counts)", "threads": "torch CPU threads (1: stable timings)",
          "batch": "latent batch"}


def parse_args(doc: str, **defaults: int) -> argparse.Namespace:
    """The command line of a benchmark: the integer flags named in ``defaults`` (size, steps, repeats, threads,
    batch) with those defaults, ``doc``'s first line as the description; INFO logging to stderr."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    for name, default in defaults.items():
        ap.add_argument(f"--{name}", type=int, default=default, help=_FLAGS[name])
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return args


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


def setup(threads: int = 1, *, load_checkpoint: bool = True):
    """Import ComfyUI (CPU, throw-away base dir with the tiny checkpoint) and the pack; no grad, no
    progress bars. Returns ``(base, (MODEL, CLIP, VAE))``, the triple None when not asked for."""
    base = Path(tempfile.mkdtemp(prefix="facecond-bench-"))
    host.import_comfy(base)
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
