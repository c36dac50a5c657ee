"""The training CLIs end to end in a subprocess (their own in-process ComfyUI) on the tiny checkpoint: real photos
are detected and embedded (insightface test-pack recogniser), 2 training steps run, and the files they write are
the nodes' files (a coefficient MLP that load_mlp reads; an embedding ComfyUI's embedding: syntax loads)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from facecond.py.celebbasis.coeffs import load_mlp
from facecond_dev import host

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cli_base(tmp_path_factory, shared_data, comfy_base):
    base = host.prepare_base(tmp_path_factory.mktemp("cli-base"), pack_dir=None)
    host.install_stand_in_models(base)
    photos = base / "photos"
    photos.mkdir()
    src = sorted((shared_data / "faces" / "johns" / "John_Salley").iterdir())[:2]
    for p in src:
        shutil.copyfile(p, photos / p.name)
    return base


def _run(script: str, base: Path, *extra: str) -> Path:
    cmd = [sys.executable, "-P", str(ROOT / "scripts" / script), "--cpu", "--base-dir", str(base),
           "--checkpoint", str(base / "models" / "checkpoints" / host.EXAMPLE_CKPT), "--photos", str(base / "photos"),
           "--embedder", host.STAND_IN_RECOGNISER, "--steps", "2", "--no-augment", *extra]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 2/2" in proc.stderr, proc.stderr[-2000:]
    return Path(proc.stdout.strip().splitlines()[-1])


def test_train_celebbasis_cli(cli_base):
    path = _run("train_celebbasis.py", cli_base, "--save-name", "cli_mlp", "--p", "32")
    assert path == cli_base / "models" / "facecond" / "celebbasis" / "cli_mlp.safetensors"
    mlp, info = load_mlp(path)
    assert info["steps"] == 2 and info["embed_dim"] == 128 and info["embedder"].startswith("insightface/")
    assert mlp.p == 32 and torch.isfinite(mlp.fc.weight).all()


def test_train_face_ti_cli(cli_base):
    path = _run("train_face_ti.py", cli_base, "--name", "cli_ti", "--init", "rand2", "--reparam", "none")
    assert path == cli_base / "models" / "embeddings" / "cli_ti.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta, vectors = f.metadata(), f.get_tensor("clip_l")
    assert meta["facecond.kind"] == "face_ti" and meta["init"].startswith("rand2: ") and meta["steps"] == "2"
    assert vectors.shape == (2, 768) and torch.isfinite(vectors).all()
