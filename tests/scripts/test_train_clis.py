"""The training CLIs end to end in a subprocess (their own in-process ComfyUI) on the tiny checkpoint: real photos
are detected and embedded (insightface test-pack recogniser), 2 training steps run, and the files they write are
the nodes' files (a coefficient MLP that load_mlp reads; an embedding ComfyUI's embedding: syntax loads)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from facecond.py.celebbasis import basis as cb
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


def test_train_celebbasis_cli(cli_base, shared_data):
    paper = shared_data / "names" / "celebbasis_wiki_names_v2.txt"
    path = _run("train_celebbasis.py", cli_base, "--save-name", "cli_mlp", "--p", "32", "--resolution", "64",
                "--names", str(paper))
    assert path == cli_base / "models" / "facecond" / "celebbasis" / "cli_mlp.safetensors"
    mlp, info = load_mlp(path)
    assert info["steps"] == 2 and info["embed_dim"] == 128 and info["embedder"].startswith("insightface/")
    assert mlp.p == 32 and torch.isfinite(mlp.fc.weight).all()
    assert info["names"] == cb.load_names(paper)  # --names reached the basis


def test_crops_are_taken_at_the_training_size():
    """scaled_affine: the 160 px crop's matrix made for another size maps pixel centres consistently: crop pixel
    (u, v) at 160 px and (u', v') at 320 px see the same source point when u' + 0.5 = 2 (u + 0.5)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from train_celebbasis import scaled_affine

    m = np.array([[0.5, 0.1, -20.0], [-0.1, 0.5, 7.0]])
    big = scaled_affine(m, 320)
    src = np.array([100.0, 60.0, 1.0])
    u, v = m @ src
    assert np.allclose(big @ src, [2 * (u + 0.5) - 0.5, 2 * (v + 0.5) - 0.5])
    assert np.array_equal(scaled_affine(m, 160), m)


def test_train_face_ti_cli(cli_base):
    path = _run("train_face_ti.py", cli_base, "--name", "cli_ti", "--init", "rand2", "--reparam", "none")
    assert path == cli_base / "models" / "embeddings" / "cli_ti.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta, vectors = f.metadata(), f.get_tensor("clip_l")
    assert meta["facecond.kind"] == "face_ti" and meta["init"].startswith("rand2: ") and meta["steps"] == "2"
    assert vectors.shape == (2, 768) and torch.isfinite(vectors).all()


# one_host: the aggregator trainer's ComfyUI calls (checkpoint, CLIP, denoiser) run on every host in
# tests/nodes/ipadapter/test_aggregator_training.py and test_train_celebbasis_cli
@pytest.mark.one_host
def test_train_aggregator_cli_paper_adapter_files_load_in_the_nodes(cli_base, shared_data, tiny_model):
    """--attention paper --train adapter, 2 steps: the full IP-Adapter file loads in the real LoadIPAdapter (its
    W'_k, W'_v trained, its other tensors carried over), the aggregator file in AggregateEmbeds (paper mode)."""
    import folder_paths

    from facecond.nodes.ipadapter.adapter import IPAdapterEncode, LoadIPAdapter, cross_attention_layers
    from facecond.nodes.ipadapter.aggregate import AggregateEmbeds
    from facecond.py.faces.types import FaceEmbeds
    from facecond.py.ipadapter import aggregate as agg
    from facecond_dev.random_weights import random_state_dict

    layers = cross_attention_layers(tiny_model[0])
    sd = random_state_dict("faceid", 128, [inner for _, inner, _ in layers], cross_dim=layers[0][2], seed=2, scale=0.5)
    sd["lora.stand_in"] = torch.arange(3.0)  # a FaceID file's other tensors must come through unchanged
    (cli_base / "models" / "ipadapter").mkdir(parents=True, exist_ok=True)
    save_file(sd, str(cli_base / "models" / "ipadapter" / "src_faceid.safetensors"))
    cmd = [sys.executable, "-P", str(ROOT / "scripts" / "train_aggregator.py"), "--base-dir", str(cli_base),
           "--data", str(shared_data / "faces" / "johns"), "--ckpt", host.EXAMPLE_CKPT, "--ipadapter",
           "src_faceid.safetensors", "--recogniser", host.STAND_IN_RECOGNISER, "--refs", "3", "--max-images", "3",
           "--size", "64", "--steps", "2", "--lr", "1e-2", "--eval-rounds", "1", "--attention", "paper",
           "--train", "adapter", "--name", "cli_kazistova"]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    agg_path, ipa_path = (Path(p) for p in proc.stdout.strip().splitlines()[-2:])
    assert agg_path == cli_base / "models" / "facecond" / "aggregators" / "cli_kazistova.safetensors"
    assert ipa_path == cli_base / "models" / "ipadapter" / "cli_kazistova.safetensors"
    with safe_open(str(ipa_path), framework="pt") as f:
        meta, full = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    assert meta["attention"] == "paper" and meta["train"] == "adapter"
    assert meta["source_ipadapter"] == "src_faceid.safetensors" and meta["ipadapter"] == "cli_kazistova.safetensors"
    assert set(full) == set(sd) | {f"aggregator.{k}" for k in ("q.weight", "k.weight", "v.weight", "out.weight",
                                                                "n_refs", "heads")}
    assert torch.equal(full["lora.stand_in"], sd["lora.stand_in"])
    assert all(not torch.equal(full[k], sd[k]) for k in sd if k != "lora.stand_in")  # all trained: 2 Adam steps
    # into the in-process ComfyUI's folders, through the real nodes
    for src, folder in ((ipa_path, "ipadapter"), (agg_path, "facecond_aggregators")):
        dest = Path(folder_paths.get_folder_paths(folder)[0])
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest / "cli_kazistova.safetensors")
    adapter, info = LoadIPAdapter().load("cli_kazistova.safetensors")
    assert "IP-Adapter (faceid)" in info and torch.equal(adapter.kv[0][0], full["ip_adapter.1.to_k_ip.weight"])
    x = torch.nn.functional.normalize(torch.randn(4, 128, generator=torch.Generator().manual_seed(0)), dim=-1)
    embeds = IPAdapterEncode().encode(adapter, "center", face_embeds=FaceEmbeds(x, "t", True, (0, 1, 2, 3)))[0]
    one, report = AggregateEmbeds().aggregate(embeds, "self-attention", "cli_kazistova.safetensors", 0)
    assert one.embeds.shape == (1, 128) and "cut to the first 3" in report
    assert "self-attention (paper mode, trained with IP-Adapter cli_kazistova.safetensors)" in report
    inside = agg.load_aggregator(ipa_path)  # the copy inside the IP-Adapter file is the same aggregator
    torch.testing.assert_close(agg.aggregate(x, "self-attention", inside)[0], one.embeds)


# one_host: --init id adds photo reading and name matching (no ComfyUI); test_train_face_ti_cli runs the TI CLI on
# every host
@pytest.mark.one_host
def test_train_face_ti_cli_id_from_celebrity_photos(cli_base, shared_data):
    """--init id --celeb-photos: one sub-folder per celebrity (John_Salley, John_Savage, John_Schneider); the
    person's photos are John Salley's, so the init is his name's two tokens. --celeb-filter without the
    precomputed portraits stops with the fix."""
    path = _run("train_face_ti.py", cli_base, "--name", "cli_ti_id", "--init", "id", "--resolution", "64",
                "--celeb-photos", str(shared_data / "faces" / "johns"))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["init"] == "id: John Salley" and meta["resolution"] == "64"
    cmd = [sys.executable, "-P", str(ROOT / "scripts" / "train_face_ti.py"), "--cpu", "--base-dir", str(cli_base),
           "--checkpoint", str(cli_base / "models" / "checkpoints" / host.EXAMPLE_CKPT), "--photos",
           str(cli_base / "photos"), "--embedder", host.STAND_IN_RECOGNISER, "--steps", "1", "--init", "id",
           "--celeb-photos", str(shared_data / "faces" / "johns"), "--celeb-filter", "0.3", "--resolution", "64"]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "--celeb-filter needs this model's portraits" in proc.stderr
