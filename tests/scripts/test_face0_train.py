"""Face0 trainer (py/train/face0_train.py, scripts/face0_train.py) on the tiny checkpoint, CPU, real photos.

Runs the CLI in subprocesses (one thread each: the CPU is shared), alone and under ``accelerate launch
--num_processes 2 --cpu`` (gloo), then loads its exports with ComfyUI's own nodes in-process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from facecond.py.faces import detect, embed
from facecond.py.faces.types import FaceEmbeds
from facecond.py.train import face0_data as fd
from facecond.py.train import face0_sources as fs
from facecond.py.train.face0_train import check_family
from facecond.py.weights import manifest as weights
from facecond_dev import host

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = str(ROOT / "scripts" / "face0_train.py")
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


@pytest.fixture(scope="module")
def shards(shared_data, tiny_model, tmp_path_factory) -> Path:
    """One shard of two real faces at 64x64 with precomputed latents (the tiny checkpoint's VAE)."""
    out = tmp_path_factory.mktemp("face0-shards")
    src = out / "src"
    src.mkdir()
    for name in ("obama/obama.jpg", "biden/biden.jpg"):
        shutil.copy(shared_data / "faces" / name, src / Path(name).name)
        (src / Path(name).name).with_suffix(".txt").write_text(f"a photo of {Path(name).stem}")
    mtcnn = detect.MTCNN(*(weights.package_file(weights.get_entry(f"mtcnn_{n}")) for n in ("pnet", "rnet", "onet")))
    rec = embed.load_onnx_recogniser(shared_data / "models/insightface_testpack/mobilefacenet_128.onnx")
    fm = fd.FaceModel(mtcnn, lambda faces: embed.l2_normalize(rec.embed(faces.crops_arcface)), rec.model_id, True)
    vae = tiny_model[2]
    rep = fd.prepare_shard(fs.folder_items(src), 0, out / fd.shard_name(0), fm, fd.PrepConfig(64, detect_max_side=512),
                           lambda imgs: vae.encode(imgs).float())
    assert rep.written == 2
    return out


def train(shards: Path, out: Path, *extra: str, launch: list[str] | None = None) -> dict:
    ckpt = str(host.tiny_checkpoint_path())
    cmd = [*(launch or [sys.executable, "-P"]), SCRIPT, "--checkpoint", ckpt, "--shards",
           str(shards / "shard-*.tar"), "--out", str(out), "--batch", "2", "--lr", "3e-3", "--log-every", "4", *extra]
    r = subprocess.run(cmd, check=False, env={**ENV, "ACCELERATE_USE_CPU": "true"}, capture_output=True, text=True,
                       timeout=400, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def lora_run(shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("face0-lora")
    train(shards, out, *LORA_ARGS)
    return out


LORA_ARGS = ("--mode", "lora", "--lora-rank", "4", "--steps", "24", "--save-every", "12")


def test_loss_falls_and_files_written(lora_run):
    s = json.loads((lora_run / "summary.json").read_text())
    assert s["family"] == "sd1" and s["end_step"] == 24 and len(s["losses"]) == 24
    # the same batch, σ and ε before and after: the trained projection + LoRA denoise it better
    assert s["fixed_loss_end"] < 0.9 * s["fixed_loss_start"], s
    assert sorted(p.name for p in (lora_run / "state").iterdir()) == ["step-00000012.safetensors",
                                                                      "step-00000024.safetensors"]
    assert list((lora_run / "face0").rglob("events.out.tfevents.*"))  # TensorBoard
    lora = load_file(str(lora_run / "face0_unet_lora.safetensors"))
    assert "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k.lora_up.weight" in lora


def test_resume_continues_exactly(shards, lora_run, tmp_path):
    (tmp_path / "state").mkdir()
    shutil.copy(lora_run / "state" / "step-00000012.safetensors", tmp_path / "state")
    s = train(shards, tmp_path, *LORA_ARGS, "--resume", "auto")
    assert s["start_step"] == 12 and s["end_step"] == 24
    full = json.loads((lora_run / "summary.json").read_text())["losses"][12:]
    assert s["losses"] == pytest.approx(full, rel=1e-5, abs=1e-7)
    a = load_file(str(lora_run / "state" / "step-00000024.safetensors"))
    b = load_file(str(tmp_path / "state" / "step-00000024.safetensors"))
    assert a.keys() == b.keys()
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) < 1e-5


# one_host: two processes agreeing is torch.distributed's business; the trainer's ComfyUI calls run on every host in
# the other tests here
@pytest.mark.one_host
def test_two_processes_agree(shards, tmp_path):
    # `accelerate launch` as a user runs it; with no GPU, --multi_gpu gives two MULTI_CPU (gloo) processes
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(host.free_port())]
    s = train(shards, tmp_path, "--mode", "full", "--steps", "2", "--batch", "1", launch=launch)
    assert s["processes"] == 2 and s["end_step"] == 2
    r0 = json.loads((tmp_path / "params-rank0.json").read_text())
    r1 = json.loads((tmp_path / "params-rank1.json").read_text())
    assert r0 == r1  # DDP all-reduced the gradients: identical parameters on both processes
    import comfy.sd

    model = comfy.sd.load_checkpoint_guess_config(s["files"]["checkpoint"])[0]
    before = comfy.sd.load_checkpoint_guess_config(str(host.tiny_checkpoint_path()))[0]
    k = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    w1, w0 = model.model.state_dict()[k].float(), before.model.state_dict()[k].float()
    assert not torch.equal(w1, w0)  # the full fine-tune changed (and exported) the U-Net


def test_exports_load_in_comfyui_nodes(lora_run, shards, comfy_base, tiny_model):
    import nodes
    from facecond.nodes.face0.projection import LoadFace0Projection, ProjectToContext

    model, clip, _ = tiny_model
    (comfy_base / "models" / "facecond" / "face0").mkdir(parents=True, exist_ok=True)
    shutil.copy(lora_run / "face0_projection.safetensors", comfy_base / "models/facecond/face0/f0_test.safetensors")
    (comfy_base / "models" / "loras").mkdir(parents=True, exist_ok=True)
    shutil.copy(lora_run / "face0_unet_lora.safetensors", comfy_base / "models/loras/f0_test_lora.safetensors")
    proj = LoadFace0Projection().load("f0_test.safetensors")[0]
    lora_model, _ = nodes.LoraLoader().load_lora(model, clip, "f0_test_lora.safetensors", 1.0, 0.0)
    n_layers = len(load_file(str(lora_run / "face0_unet_lora.safetensors"))) // 3
    assert len(lora_model.patches) == n_layers  # every LoRA key mapped onto a U-Net weight
    sample = fd.decode_sample(next(fd.iter_shard(shards / "shard-000000.tar"))[1])
    fe = FaceEmbeds(sample["embedding"][None], sample["embedder"], True, (0,))
    cond = nodes.CLIPTextEncode().encode(clip, "a photo of a man")[0]
    pos, text_only, _, neg = ProjectToContext().project(cond, fe, proj, clip, "each")
    latent = {"samples": torch.zeros(1, 4, 8, 8)}

    def gen(m, c):
        return nodes.common_ksampler(m, 7, 4, 4.0, "euler", "normal", c, neg, latent)[0]["samples"]

    with_face, zero_face = gen(lora_model, pos), gen(lora_model, text_only)
    assert (with_face - zero_face).abs().max() > 1e-3  # the face changes the image
    assert (gen(model, pos) - with_face).abs().max() > 1e-4  # and so does the LoRA


def test_other_family_refused(lora_run, shards, tmp_path):
    with pytest.raises(ValueError, match=r"Flux.*supports SD1\.x, SD2\.x and SDXL"):
        check_family("Flux", "FLOW", 4096)
    assert check_family("SDXL", "EPS", 2048) == "sdxl"  # tests/scripts/test_face0_train_sdxl.py trains it
    with pytest.raises(ValueError, match="prediction type is FLOW"):
        check_family("SD15", "FLOW", 768)
    assert check_family("SD20", "V_PREDICTION", 1024) == "sd2"
    r = subprocess.run([sys.executable, "-P", SCRIPT, "--checkpoint", str(lora_run / "face0_projection.safetensors"),
                        "--shards", str(shards / "shard-000000.tar"), "--out", str(tmp_path)], check=False,
                       capture_output=True, text=True, timeout=120, env=ENV, cwd=ROOT)
    assert r.returncode != 0 and "face0_train:" in r.stderr
