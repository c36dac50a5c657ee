"""The multi-reference IP-Adapter example workflow, end to end through the headless server on the tiny checkpoint.

What the test changes, and why: the workflow's FaceID IP-Adapter (512-d, for insightface buffalo_l) cannot be
downloaded here, so a tiny random FaceID IP-Adapter is written at test time in the real nested ``.bin`` key
layout, under the real file name, sized for the tiny checkpoint's cross-attentions and for the 128-d insightface
test-pack recogniser, which replaces buffalo_l in FaceEmbed (as ``host.use_stand_ins`` does for FaceNet), with a
rank-8 FaceID LoRA on the tiny U-Net's 6 attentions, as the real file carries one (rank 128 on SD1.5's 32). One of
the four references is a faceless grey image: it must be skipped, not fatal. Steps and size are cut for speed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from facecond.nodes.ipadapter.adapter import cross_attention_layers
from facecond_dev import host
from facecond_dev.random_weights import random_state_dict

WORKFLOW = host.example_workflow("ipadapter_multi_reference.json")  # the variant for the ComfyUI under test


@pytest.fixture(scope="module")
def ipa_server(server, shared_data, tiny_model):
    base = Path(server.base_dir)
    obama = shared_data / "faces" / "obama"
    host.copy_inputs(base, {"ipa_reference_1.jpg": obama / "obama.jpg", "ipa_reference_3.jpg": obama / "obama2.jpg",
                            "ipa_reference_4.jpg": obama / "obama3.jpg"})
    Image.fromarray(np.full((200, 160, 3), 128, np.uint8)).save(base / "input" / "ipa_reference_2.jpg", "JPEG")
    host.install_stand_in_models(base)
    layers = cross_attention_layers(tiny_model[0])
    flat = random_state_dict("faceid", 128, [inner for _, inner, _ in layers], cross_dim=layers[0][2], seed=3,
                                 scale=0.5, lora_rank=8)
    nested = {part: {k[len(part) + 1:]: v for k, v in flat.items() if k.startswith(part + ".")}
              for part in ("image_proj", "ip_adapter")}
    (base / "models" / "ipadapter").mkdir(parents=True, exist_ok=True)
    torch.save(nested, base / "models" / "ipadapter" / "ip-adapter-faceid_sd15.bin")
    server.object_info(refresh=True)
    return server


def _prompt(server, weight: float, lora_strength: float = 1.0) -> dict:
    # FaceEmbed: buffalo_l is not installed here, so the 128-d test-pack recogniser stands in (use_stand_ins)
    return host.quick_prompt(WORKFLOW, server.object_info(), server.base_dir,
                             {"FacecondApplyIPAdapter": {"weight": weight, "lora_strength": lora_strength}})


def test_multi_reference_example_runs_and_the_adapter_acts(ipa_server):
    saved = {}
    for weight, lora_strength in ((0.8, 1.0), (0.0, 1.0), (0.8, 0.0)):
        result = ipa_server.run(_prompt(ipa_server, weight, lora_strength))
        assert result.status == "success", (result.error or {}).get("exception_message", result.error)
        images = ipa_server.output_images(result)
        out = [p for p in images if "facecond_ipadapter_multi_reference" in p.name]
        assert len(out) == 1, images
        saved[weight, lora_strength] = np.asarray(Image.open(out[0]).convert("RGB"), np.float32)
    assert saved[0.8, 1.0].shape == (64, 64, 3)
    assert np.abs(saved[0.8, 1.0] - saved[0.0, 1.0]).max() > 1.0  # the aggregated image prompt changes the picture
    assert np.abs(saved[0.8, 1.0] - saved[0.8, 0.0]).max() > 1.0  # and so does the file's LoRA
    log = ipa_server.process.log_tail(20000)
    assert "3 references (face" in log and "images [1] had no usable face" in log, log[-2000:]
    assert "LoRA of ip-adapter-faceid_sd15.bin on 24 attention weights (rank 8, strength 1)" in log, log[-2000:]
