"""Every FaceChain example workflow, end to end through the headless server on the tiny checkpoint.

What the test changes, and why: FaceEmbed is switched to the insightface test-pack recogniser (FaceNet cannot be
downloaded here, ``host.use_stand_ins``); the two LoRA files the examples load are tiny random LoRAs for the
tiny checkpoint, written here in ComfyUI's generic key format; steps, sizes and the working resolution are cut
(64 px) and TrainLoraNode trains 2 steps in fp32 (bf16 is for GPUs). The tiny checkpoint draws noise, never a
face, so the generate -> rank -> fuse graph runs its no-face path; a second run feeds real photos in as the
"generated" batch to exercise ranking and fusion on faces. FaceChainTagFaces reads a stand-in genderage model
built here (constant output: male, 52) instead of buffalo_l's, which cannot be downloaded here.


face, so the generate -> fuse -> rank graph runs its no-face path; a second run feeds real photos in as the
"generated" batch to exercise fusion with the template and ranking on faces (at denoise 0: the tiny random UNet
redraws any crop into noise, so only the template's pixel fusion can keep a face there), and a third adds an
inswapper-signature stand-in swap model written here with the ``onnx`` package.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from facecond_dev import host

SAVED = {"facechain_rank_and_fuse.json": ("facechain_fused", 2),
         "facechain_face_lora_style_lora.json": ("facechain_lora", 4),
         "facechain_train_face_lora.json": ("facechain_trained", 2)}
LORAS = ("facechain_face_lora.safetensors", "facechain_style_lora.safetensors")
TAGGED = "facechain_tag_faces.json"  # writes a dataset folder, saves no image
GENDERAGE = "ga_standin/genderage.onnx"


def _photo(src: Path, side: int) -> Image.Image:
    """Letterboxed into side x side (same size for ImageBatch, small for a fast MTCNN)."""
    im = Image.open(src).convert("RGB")
    im.thumbnail((side, side), Image.LANCZOS)
    canvas = Image.new("RGB", (side, side))
    canvas.paste(im, ((side - im.width) // 2, (side - im.height) // 2))
    return canvas


def _random_lora(model, seed: int) -> dict[str, torch.Tensor]:
    """Rank-4 LoRA on every attention projection of the tiny UNet (generic 'diffusion_model.X.lora_up' keys)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in model.model.state_dict().items():
        if k.startswith("diffusion_model.") and k.endswith((".to_q.weight", ".to_k.weight", ".to_v.weight")):
            base = k[: -len(".weight")]
            out[f"{base}.lora_down.weight"] = torch.randn(4, v.shape[1], generator=g) * 0.1
            out[f"{base}.lora_up.weight"] = torch.randn(v.shape[0], 4, generator=g) * 0.1
    return out


@pytest.fixture(scope="module")
def facechain_server(server, shared_data, tiny_model):
    base = Path(server.base_dir)
    faces = shared_data / "faces"
    _photo(faces / "obama/obama.jpg", 320).save(base / "input/facechain_user_photo.jpg", quality=95)
    _photo(faces / "obama/obama_partial_face.jpg", 320).save(base / "input/facechain_user_photo2.jpg", quality=95)
    gen = {"facechain_gen_biden.png": faces / "biden/biden.jpg", "facechain_gen_obama2.png": faces / "obama/obama2.jpg",
           "facechain_gen_john.png": faces / "johns/John_Salley/000179_02159509.jpg"}
    for name, src in gen.items():
        _photo(src, 256).save(base / "input" / name)
    Image.new("RGB", (256, 256), (128, 128, 128)).save(base / "input/facechain_gen_blank.png")
    loras = base / "models/loras"
    loras.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(LORAS):
        if not (loras / name).exists():
            lora = _random_lora(tiny_model[0], i)
            assert len(lora) >= 6
            save_file(lora, str(loras / name))
    host.install_stand_in_models(base)
    from facecond_dev.onnx_standins import genderage_model

    genderage_model(base / "models/insightface/models" / GENDERAGE, 0.1, 0.9, 52)
    server.object_info(refresh=True)
    return server


def _prompt(server, name: str) -> dict:
    small = {"FacecondFaceFusion": {"steps": 2, "resolution": 64}, "FacecondFaceChainPreprocess": {"resolution": 64},
             "TrainLoraNode": {"steps": 2, "rank": 4, "training_dtype": "fp32", "lora_dtype": "fp32",
                               "gradient_checkpointing": False},
             "FacecondFaceChainTagFaces": {"genderage_model": GENDERAGE}}
    return host.quick_prompt(host.example_workflow(name), server.object_info(), server.base_dir, small)


def _saved(server, result, prefix):
    return [p for p in server.output_images(result) if p.name.startswith(prefix)]


@pytest.mark.parametrize("name", sorted(SAVED))
def test_example_workflow_runs(facechain_server, name):
    server = facechain_server
    result = server.run(_prompt(server, name))
    assert result.status == "success", (result.error or {}).get("exception_message", result.error)
    prefix, count = SAVED[name]
    saved = _saved(server, result, prefix)
    assert len(saved) == count, server.output_images(result)
    if name == "facechain_train_face_lora.json":
        trained = list((Path(server.base_dir) / "output/loras").glob("facechain_face_lora_2_steps_*.safetensors"))
        assert trained, "SaveLoRA wrote nothing"
        report = "".join(result.outputs["25"]["text"])
        # 2 photos x 20 epochs (the test then overrides TrainLoraNode's steps with 2); male, 52 -> 40+ -> mature
        assert "trigger word: a mature man" in report and "= 40 steps" in report, report


def test_tagging_example_writes_the_captioned_set(facechain_server):
    server = facechain_server
    dataset = Path(server.base_dir) / "output/facechain/person"
    result = server.run(_prompt(server, TAGGED))
    assert result.status == "success", (result.error or {}).get("exception_message", result.error)
    report = "".join(result.outputs["25"]["text"])
    assert report.startswith("trigger word: a mature man (sum p_male 1.800 vs p_female 0.200; ages [52, 52])"), report
    assert sorted(p.name for p in dataset.iterdir()) == ["0000.png", "0000.txt", "0001.png", "0001.txt",
                                                         "metadata.jsonl"]
    assert (dataset / "0001.txt").read_text() == "sks, a mature man"
    assert Image.open(dataset / "0000.png").size == (64, 64)


def test_every_facechain_example_is_tested():
    assert sorted(f"{f}.json" for f in host.example_workflows() if f.startswith("facechain_")) == \
        sorted([*SAVED, TAGGED, "facechain_rank_and_fuse_sdxl.json"])  # SDXL: test_family_workflows.py


def _real_photos_prompt(server) -> tuple[dict, list[str]]:
    """The rank-and-fuse example with real photos as the 'generated' batch and FaceFusion at denoise 0."""
    prompt = _prompt(server, "facechain_rank_and_fuse.json")
    names = ["facechain_gen_biden.png", "facechain_gen_obama2.png", "facechain_gen_john.png", "facechain_gen_blank.png"]
    for k, name in enumerate(names):
        prompt[f"9{k}"] = {"class_type": "LoadImage", "inputs": {"image": name}}
    if "BatchImagesNode" in server.object_info():  # current ComfyUI (ImageBatch is deprecated there)
        prompt["97"] = {"class_type": "BatchImagesNode", "inputs": {f"images.image{k}": [f"9{k}", 0] for k in range(4)}}
    else:  # ComfyUI 0.3.x
        prompt["95"] = {"class_type": "ImageBatch", "inputs": {"image1": ["90", 0], "image2": ["91", 0]}}
        prompt["96"] = {"class_type": "ImageBatch", "inputs": {"image1": ["95", 0], "image2": ["92", 0]}}
        prompt["97"] = {"class_type": "ImageBatch", "inputs": {"image1": ["96", 0], "image2": ["93", 0]}}
    for node in prompt.values():
        for key, value in node["inputs"].items():
            if value == ["7", 0]:  # the VAEDecode of the generations
                node["inputs"][key] = ["97", 0]
    prompt["18"]["inputs"].update(resolution=128, denoise=0.0)
    return prompt, names


def test_fuse_then_rank_on_real_photos(facechain_server):
    """The generated batch replaced by real photos: every face is fused with the template (Obama), then ranked;
    the other Obama photo ranks first, the blank image last, and pixels away from the faces are kept exactly."""
    server = facechain_server
    prompt, names = _real_photos_prompt(server)
    assert prompt["18"]["inputs"]["images"] == ["97", 0] and prompt["16"]["inputs"]["images"] == ["18", 0]
    assert prompt["18"]["inputs"]["template"] == ["12", 0] and prompt["18"]["inputs"]["template_strength"] == 0.5
    result = server.run(prompt)
    assert result.status == "success", (result.error or {}).get("exception_message", result.error)
    ranking = "".join(result.outputs["21"]["text"])
    lines = [ln for ln in ranking.splitlines() if ln.startswith("#")]
    assert lines[0].startswith("#1: image 1 ") and lines[-1] == "#4: image 3 no face (score -1)", ranking
    fusion_report = "".join(result.outputs["23"]["text"])
    for i in range(3):
        assert f"image {i}: face {i} fused (template 0.5;" in fusion_report, fusion_report
    assert "image 3: no face, passed through unchanged" in fusion_report, fusion_report
    fused = _saved(server, result, "facechain_fused")
    assert len(fused) == 2
    best_in = np.asarray(Image.open(Path(server.base_dir) / "input" / names[1]).convert("RGB"))
    best_out = np.asarray(Image.open(fused[0]).convert("RGB"))
    same = (best_in == best_out).all(-1)
    assert 0.5 < same.mean() < 1.0  # the face region was fused, the rest kept exactly


def test_fuse_with_a_swap_model(facechain_server):
    """swap_model: an inswapper-signature stand-in in models/insightface (emap for the 128-d test recogniser that
    embeds the template here) runs on every face before the template blend and the re-diffusion."""
    pytest.importorskip("onnx")
    from facecond_dev import stand_in_swap

    server = facechain_server
    path = stand_in_swap.write_stand_in(Path(server.base_dir) / "models/insightface/inswapper_stand_in.onnx",
                                        embed_dim=128)
    try:
        _run_swap(server)
    finally:  # other tests list the folder's models
        path.unlink()
        server.object_info(refresh=True)


def _run_swap(server):
    server.object_info(refresh=True)
    assert "inswapper_stand_in.onnx" in server.object_info()["FacecondFaceFusion"]["input"]["optional"]["swap_model"][0]
    prompt, _ = _real_photos_prompt(server)
    prompt["18"]["inputs"].update(swap_model="inswapper_stand_in.onnx", denoise=0.3)
    result = server.run(prompt)
    assert result.status == "success", (result.error or {}).get("exception_message", result.error)
    fusion_report = "".join(result.outputs["23"]["text"])
    assert "swap inswapper_stand_in.onnx" in fusion_report.splitlines()[0], fusion_report
    assert "image 1: face 1 fused (swapped, template 0.5, re-diffused;" in fusion_report, fusion_report
    assert len(_saved(server, result, "facechain_fused")) == 2
