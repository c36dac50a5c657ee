"""Face0 training on the tiny SDXL checkpoint (scripts/face0_train.py, py/train/face0_train.py, face0_data.py).

Two real photos prepared at 64 px with the SDXL VAE (each sample stores its original size and crop corner), two
LoRA steps in a subprocess (the CLI as users run it), then in-process: step 0's loss equals a hand-computed
denoising loss through ComfyUI's own ``apply_model(..., y=...)``, with y built by ComfyUI's sampler code from
CLIPTextEncode's pooled output + the stored size and crop, and the face placed by ProjectToContext (the inference
path); the exported projection loads in LoadFace0Projection and drives ProjectToContext on SDXL (both halves); the
LoRA loads in LoraLoader. Cheap by design: 64 px, batch 2 (one caption, two photos of other sizes), 2 steps; in this
process one SDXL text encode (the empty prompt) besides the session's shared family_cond.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from facecond.py.face0.projection import ProjectionInfo, random_projection, save_projection
from facecond.py.faces import embed
from facecond.py.faces.types import FaceEmbeds
from facecond.py.train import face0_data as fd
from facecond.py.train import face0_sources as fs
from facecond.py.train import face0_train as ft
from facecond_dev import host
from facecond_dev.comfy_loss import comfy_y, hand_loss

pytestmark = pytest.mark.parametrize("family", ["sdxl"], indirect=True)

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = str(ROOT / "scripts" / "face0_train.py")
PHOTOS = ("biden/biden.jpg", "obama/obama.jpg")  # the order folder_items lists them in
SIDE = 64
CAPTION = "a photo of a person"  # family_cond's text: the session's one SDXL encode of it is reused here


@pytest.fixture(scope="module")
def sdxl_shards(shared_data, family_model, mtcnn, tmp_path_factory) -> Path:
    """One shard of two real faces at 64x64 with the tiny SDXL VAE's latents."""
    out = tmp_path_factory.mktemp("face0-sdxl-shards")
    src = out / "src"
    src.mkdir()
    for name in PHOTOS:
        shutil.copy(shared_data / "faces" / name, src / Path(name).name)
        (src / Path(name).name).with_suffix(".txt").write_text(CAPTION)
    rec = embed.load_onnx_recogniser(shared_data / "models/insightface_testpack/mobilefacenet_128.onnx")
    fm = fd.FaceModel(mtcnn, lambda faces: embed.l2_normalize(rec.embed(faces.crops_arcface)), rec.model_id, True)
    vae = family_model[2]
    rep = fd.prepare_shard(fs.folder_items(src), 0, out / fd.shard_name(0), fm,
                           fd.PrepConfig(SIDE, detect_max_side=512), lambda imgs: vae.encode(imgs).float())
    assert rep.written == 2
    return out


@pytest.fixture(scope="module")
def empty_cond(family_model):
    import nodes

    return nodes.CLIPTextEncode().encode(family_model[1], "")[0]


@pytest.fixture(scope="module")
def sdxl_run(sdxl_shards, family_ckpt, tmp_path_factory):
    """(run folder, the starting projection): 2 LoRA steps from a saved random 2048-wide projection, no face
    dropout (the hand-computed loss below needs no mask)."""
    out = tmp_path_factory.mktemp("face0-sdxl-run")
    sample = fd.decode_sample(next(fd.iter_shard(sdxl_shards / "shard-000000.tar"))[1])
    proj = random_projection(ProjectionInfo(embedder=sample["embedder"], embed_dim=sample["embedding"].shape[0],
                                            context_dim=2048, base_model="sdxl"), seed=4)
    save_projection(proj, out / "start.safetensors")
    cmd = [sys.executable, "-P", SCRIPT, "--checkpoint", str(host.tiny_checkpoint_path("sdxl")), "--shards",
           str(sdxl_shards / "shard-*.tar"), "--out", str(out), "--projection", str(out / "start.safetensors"),
           "--mode", "lora", "--lora-rank", "4", "--steps", "2", "--batch", "2", "--lr", "3e-3", "--face-drop", "0",
           "--log-every", "1", "--save-every", "2"]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "ACCELERATE_USE_CPU": "true"}
    r = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return out, proj


def test_prepared_samples_store_original_size_and_crop(sdxl_shards, shared_data):
    from facecond.nodes.model_family import checkpoint_native_resolution

    samples = [fd.decode_sample(g) for _, g in fd.iter_shard(sdxl_shards / "shard-000000.tar")]
    for s, name in zip(samples, PHOTOS, strict=True):
        w, h = Image.open(shared_data / "faces" / name).size
        assert s["original_size"] == (h, w) and s["latent"].shape == (4, SIDE // 8, SIDE // 8)
        # the centre crop of the image resized to short side 64 (square_crop)
        scale = SIDE / min(w, h)
        top, left = (max(SIDE, round(h * scale)) - SIDE) // 2, (max(SIDE, round(w * scale)) - SIDE) // 2
        assert s["crop_top_left"] == (top, left)
    assert samples[0]["original_size"] != samples[1]["original_size"]  # two photos, two sizes
    # face0_prepare.py's default --resolution: the checkpoint's native size
    assert checkpoint_native_resolution(host.tiny_checkpoint_path("sdxl")) == 1024
    assert checkpoint_native_resolution(host.tiny_checkpoint_path()) == 512


def test_first_step_loss_equals_comfy_model_call_with_y(sdxl_run, sdxl_shards, family_model, family_cond,
                                                         empty_cond):
    from facecond.nodes.face0.projection import ProjectToContext

    out, proj = sdxl_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["family"] == "sdxl" and summary["mode"] == "lora" and summary["end_step"] == 2
    model, clip, _ = family_model
    stream = ft.sample_stream([str(sdxl_shards / "shard-000000.tar")], 0, 1, 0)  # the trainer's first batch
    batch = ft.collate([next(stream) for _ in range(2)])
    x0 = model.model.process_latent_in(batch["latent"]).float()
    contexts, ys = [], []
    assert batch["captions"] == [CAPTION, CAPTION]
    for i in range(2):
        cond = family_cond  # CLIPTextEncode(CAPTION); ProjectToContext copies it
        fe = FaceEmbeds(batch["embeds"][i:i + 1], batch["embedder"], True, (0,))
        positive = ProjectToContext().project(cond, fe, proj, clip, "each", empty_conditioning=empty_cond)[0]
        contexts.append(positive[0][0][:, :77])
        (h, w), (top, left) = batch["original_sizes"][i], batch["crops_top_left"][i]
        sized = [[positive[0][0], {"pooled_output": cond[0][1]["pooled_output"], "width": w, "height": h,
                                   "crop_w": left, "crop_h": top, "target_width": SIDE, "target_height": SIDE}]]
        ys.append(comfy_y(model, sized, x0[i:i + 1]))
    context, y = torch.cat(contexts), torch.cat(ys)
    assert y.shape == (2, 2816) and not torch.equal(y[0], y[1])  # each photo's own size and crop
    # step 0's draws (seed 0, micro-step 0, rank 0 of 1: σ, ε, the dropout mask, all-False at --face-drop 0)
    sigma, noise, drop = ft.draw(x0, model.model.model_sampling.sigmas, ft.micro_generator(0, 0, 0, 1), 0.0)
    assert not drop.any()
    hand, y_used = hand_loss(model, x0, sigma, noise, context, y)
    assert summary["losses"][0] == pytest.approx(hand, rel=1e-4, abs=1e-6)
    assert y_used  # without y the prediction (and the loss) differ


def test_exports_drive_project_to_context_and_lora_loads(sdxl_run, sdxl_shards, family_model, family_cond,
                                                         empty_cond, comfy_base):
    import nodes
    from facecond.nodes.face0.projection import LoadFace0Projection, ProjectToContext

    out, start = sdxl_run
    model, clip, _ = family_model
    (comfy_base / "models/facecond/face0").mkdir(parents=True, exist_ok=True)
    shutil.copy(out / "face0_projection.safetensors", comfy_base / "models/facecond/face0/f0_sdxl_test.safetensors")
    (comfy_base / "models/loras").mkdir(parents=True, exist_ok=True)
    shutil.copy(out / "face0_unet_lora.safetensors", comfy_base / "models/loras/f0_sdxl_test_lora.safetensors")
    proj = LoadFace0Projection().load("f0_sdxl_test.safetensors")[0]
    assert proj.info.context_dim == 2048 and proj.info.base_model == "sdxl"
    sample = fd.decode_sample(next(fd.iter_shard(sdxl_shards / "shard-000000.tar"))[1])
    fe = FaceEmbeds(sample["embedding"][None], sample["embedder"], True, (0,))
    with torch.no_grad():
        tokens, untrained = proj(fe.embeds)[0], start(fe.embeds)[0]
    assert not torch.allclose(tokens, untrained)  # the projection trained
    before = family_cond[0][0].clone()
    pos, text_only, _, _ = ProjectToContext().project(family_cond, fe, proj, clip, "each",
                                                      empty_conditioning=empty_cond)
    assert torch.equal(family_cond[0][0], before)
    # the face in tokens 75-77 of both halves: CLIP-L's 768 channels and CLIP-G's 1280
    torch.testing.assert_close(pos[0][0][0, 74:77, :768], tokens[:, :768])
    torch.testing.assert_close(pos[0][0][0, 74:77, 768:], tokens[:, 768:])
    assert torch.count_nonzero(text_only[0][0][0, 74:77]) == 0
    assert pos[0][1]["pooled_output"] is family_cond[0][1]["pooled_output"]
    lora_model, _ = nodes.LoraLoader().load_lora(model, clip, "f0_sdxl_test_lora.safetensors", 1.0, 0.0)
    n_layers = len(load_file(str(out / "face0_unet_lora.safetensors"))) // 3
    assert n_layers > 0 and len(lora_model.patches) == n_layers  # every LoRA key mapped onto an SDXL U-Net weight


def test_shards_without_size_and_crop(sdxl_shards, family_model, tiny_model):
    """Shards written before SDXL support (no original size / crop): SD1.x trains on them as before (y None); SDXL
    refuses them, saying to prepare the data again."""
    batch = ft.collate([fd.decode_sample(g) for _, g in fd.iter_shard(sdxl_shards / "shard-000000.tar")])
    old = {**batch, "original_sizes": [None, None], "crops_top_left": [None, None]}
    pooled = torch.zeros(2, 1280)
    assert ft.batch_adm(tiny_model[0].model, old, None, SIDE) is None
    with pytest.raises(ValueError, match=r"face0_train: this SDXL checkpoint needs each sample's original size and "
                                         r"crop .*re-run scripts/face0_prepare.py"):
        ft.batch_adm(family_model[0].model, old, pooled, SIDE)
    y = ft.batch_adm(family_model[0].model, batch, pooled, SIDE)
    assert y.shape == (2, 2816) and not torch.equal(y[0], y[1])
