"""The SDXL FaceID example workflows end to end through the headless server: FaceID Plus v2 from one photo and
FaceID Portrait from several, on the tiny SDXL checkpoint (host.tiny_checkpoint_path("sdxl") under its real name).

What the test changes, and why: the published adapters cannot be downloaded here, so random-weight files are written
at test time in the published layouts (nested ``.bin`` dicts, the published file names: FaceID Plus v2 is told by
its name), sized for the tiny SDXL U-Net's cross-attentions (read from the checkpoint's keys) and for the 128-d
insightface test-pack recogniser that replaces buffalo_l in FaceEmbed (``host.use_stand_ins``); the FaceID Plus v2
file carries a rank-4 LoRA as the real one carries rank 128. CLIPVisionLoader gets a random-weight ViT-H/14
(``random_clip_vision``: its config detection only builds full-size encoders, so the stand-in is full size, 1.26 GB,
written once into the host cache). Steps and size are cut for speed (``host.QUICK``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from facecond_dev import host
from facecond_dev.random_clip_vision import NAME as CLIP_VISION_NAME
from facecond_dev.random_clip_vision import write_random_vit_h
from facecond_dev.random_weights import random_state_dict

pytestmark = [pytest.mark.family, pytest.mark.every_host]  # queued on both hosts (issue 20), not only 0.28

PLUS = host.example_workflow("ipadapter_faceid_plusv2_sdxl.json")
PORTRAIT = host.example_workflow("ipadapter_faceid_portrait_sdxl.json")


def cross_attention_dims(ckpt: Path) -> tuple[list[int], int]:
    """(inner width of each cross-attention in IP-Adapter order: input, output, middle blocks; context width)."""
    order = {"input_blocks": 0, "output_blocks": 1, "middle_block": 2}
    found = []
    with safe_open(str(ckpt), "pt") as f:
        for k in f.keys():
            if k.startswith("model.diffusion_model.") and k.endswith(".attn2.to_k.weight"):
                parts = k.split(".")
                block = parts[2]
                num = int(parts[3]) if block != "middle_block" else 0
                j = int(parts[parts.index("transformer_blocks") + 1])
                found.append(((order[block], num, j), tuple(f.get_slice(k).get_shape())))
    found.sort()
    return [shape[0] for _, shape in found], found[0][1][1]


def _bin(sd: dict, path: Path) -> None:
    torch.save({p: {k[len(p) + 1:]: v for k, v in sd.items() if k.startswith(p + ".")}
                for p in ("image_proj", "ip_adapter")}, path)


@pytest.fixture(scope="module")
def sdxl_server(server, shared_data):
    base = Path(server.base_dir)
    host.link_family_checkpoint(base, "sdxl")
    obama = shared_data / "faces" / "obama"
    host.copy_inputs(base, {"faceid_reference.jpg": obama / "obama.jpg", "ipa_reference_1.jpg": obama / "obama.jpg",
                            "ipa_reference_3.jpg": obama / "obama2.jpg", "ipa_reference_4.jpg": obama / "obama3.jpg"})
    Image.fromarray(np.full((200, 160, 3), 128, np.uint8)).save(base / "input" / "ipa_reference_2.jpg", "JPEG")
    host.install_stand_in_models(base)
    layers, ctx = cross_attention_dims(host.tiny_checkpoint_path("sdxl"))
    folder = base / "models" / "ipadapter"
    folder.mkdir(parents=True, exist_ok=True)
    _bin(random_state_dict("faceid_plus", 128, layers, cross_dim=ctx, depth=1, inner=64, clip_dim=1280, seed=6,
                           scale=0.5, lora_rank=4), folder / "ip-adapter-faceid-plusv2_sdxl.bin")
    _bin(random_state_dict("faceid", 128, layers, cross_dim=ctx, tokens=16, seed=7, scale=0.5),
         folder / "ip-adapter-faceid-portrait_sdxl.bin")
    cv = base / "models" / "clip_vision" / CLIP_VISION_NAME
    if not cv.exists():
        cv.parent.mkdir(parents=True, exist_ok=True)
        cv.symlink_to(write_random_vit_h(host.HOST_DIR / "cache" / "random_clip_vit_h.safetensors"))
    server.object_info(refresh=True)
    return server


def _run(server, workflow, prefix, overrides):
    prompt = host.quick_prompt(workflow, server.object_info(), server.base_dir, overrides)
    result = server.run(prompt, timeout=900)  # SDXL CLIP-G and the ViT-H stand-in on a CPU: minutes
    assert result.status == "success", (result.error or {}).get("exception_message", result.error)
    out = [p for p in server.output_images(result) if prefix in p.name]
    assert len(out) == 1
    return np.asarray(Image.open(out[0]).convert("RGB"), np.float32)


def test_faceid_plusv2_sdxl_from_one_photo(sdxl_server):
    prefix = "facecond_ipadapter_faceid_plusv2_sdxl"
    on = _run(sdxl_server, PLUS, prefix, {"FacecondApplyIPAdapter": {"weight": 0.8}})
    off = _run(sdxl_server, PLUS, prefix, {"FacecondApplyIPAdapter": {"weight": 0.0, "lora_strength": 0.0}})
    assert on.shape == (64, 64, 3) and np.abs(on - off).max() > 1.0
    log = sdxl_server.process.log_tail(30000)
    assert "FaceID Plus v2 (SDXL) IP-Adapter (faceid_plusv2)" in log, log[-2000:]
    assert "1 references (face+clip_hidden" in log, log[-2000:]
    assert "LoRA of ip-adapter-faceid-plusv2_sdxl.bin on" in log, log[-2000:]


def test_faceid_portrait_sdxl_from_several_photos(sdxl_server):
    prefix = "facecond_ipadapter_faceid_portrait_sdxl"
    on = _run(sdxl_server, PORTRAIT, prefix, {"FacecondApplyIPAdapter": {"weight": 0.8}})
    off = _run(sdxl_server, PORTRAIT, prefix, {"FacecondApplyIPAdapter": {"weight": 0.0}})
    assert np.abs(on - off).max() > 1.0
    log = sdxl_server.process.log_tail(30000)
    assert "FaceID Portrait (SDXL) IP-Adapter (faceid_portrait)" in log, log[-2000:]
    assert "3 references (face" in log and "images [1] had no usable face" in log, log[-2000:]
