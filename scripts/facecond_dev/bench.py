"""What every benchmark in bench/ shares: an in-process ComfyUI on the tiny checkpoint, and CPU timing.

Timings are the least *process CPU time* over repeats, with one torch thread by default: on a shared
machine other processes steal cores, which inflates wall time but not the work this process does.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from . import host


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
