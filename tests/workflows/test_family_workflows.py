"""The SDXL example workflows (Face0, FaceChain fusion), queued headless on the server with the tiny SDXL checkpoint
linked under the name SDXL users have (sd_xl_base_1.0.safetensors), stand-in face models and an untrained 2048-wide
Face0 projection (as test_face0_workflows.py / test_facechain_workflows.py do for SD1.5), 64 px and 2 steps. Marker
``family`` (through the ``family`` fixture): scripts/test_hosts.sh runs these on the 0.28 host."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from facecond_dev import host

pytestmark = pytest.mark.parametrize("family", ["sdxl"], indirect=True)


@pytest.fixture(scope="module")
def sdxl_server(server, shared_data):
    base = Path(server.base_dir)
    host.link_family_checkpoint(base, "sdxl")
    faces = shared_data / "faces"
    for name, src in {"face0_photo.jpg": faces / "obama/obama.jpg",
                      "facechain_user_photo.jpg": faces / "obama/obama.jpg",
                      "facechain_user_photo2.jpg": faces / "obama/obama_partial_face.jpg"}.items():
        im = Image.open(src).convert("RGB")
        im.thumbnail((320, 320))
        canvas = Image.new("RGB", (320, 320))  # one size for the photo batch, small for a fast MTCNN
        canvas.paste(im, ((320 - im.width) // 2, (320 - im.height) // 2))
        canvas.save(base / "input" / name, quality=95)
    host.install_stand_in_models(base)
    host.install_stand_in_projection(base, "face0_sdxl_test.safetensors", 2048, "sdxl")
    server.object_info(refresh=True)
    return server


def _run(server, name, overrides=None):
    prompt = host.quick_prompt(host.example_workflow(name), server.object_info(), server.base_dir, overrides)
    result = server.run(prompt)
    assert result.status == "success", (result.error or {}).get("exception_message", result.error)
    return prompt, result


def test_face0_sdxl_example_runs(family, sdxl_server):
    prompt, result = _run(sdxl_server, "face0_single_photo_sdxl")
    assert any(n["class_type"] == "CheckpointLoaderSimple" and n["inputs"]["ckpt_name"] == host.FAMILY_CKPTS["sdxl"]
               for n in prompt.values())
    images = [p for p in sdxl_server.output_images(result) if p.name.startswith("face0_sdxl_single")]
    assert len(images) == 1 and Image.open(images[0]).size == (64, 64)


def test_facechain_fusion_sdxl_example_runs(family, sdxl_server):
    # FaceFusion keeps the example's resolution 0 (the model's native size) except in the size: 64 px here
    small = {"FacecondFaceFusion": {"steps": 2, "resolution": 64}, "EmptyLatentImage": {"batch_size": 2},
             "FacecondRankBySimilarity": {"top_k": 2}}
    _, result = _run(sdxl_server, "facechain_rank_and_fuse_sdxl", small)
    saved = [p for p in sdxl_server.output_images(result) if p.name.startswith("facechain_sdxl_fused")]
    assert len(saved) == 2 and all(Image.open(p).size == (64, 64) for p in saved)


def test_sdxl_examples_default_to_the_native_size(family):
    """As shipped: SDXL's 1024 px latents and FaceFusion at resolution 0 (= the model's native size)."""
    import json

    for name in ("face0_single_photo_sdxl", "facechain_rank_and_fuse_sdxl"):
        nodes = json.loads(host.example_workflow(name).read_text())["nodes"]
        assert [n["widgets_values"][:2] for n in nodes if n["type"] == "EmptyLatentImage"] == [[1024, 1024]]
        assert all(n["widgets_values"][7] == 0 for n in nodes if n["type"] == "FacecondFaceFusion")
        assert [n["widgets_values"][0] for n in nodes if n["type"] == "CheckpointLoaderSimple"] == \
            [host.FAMILY_CKPTS["sdxl"]]
