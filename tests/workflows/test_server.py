"""The pack in a real headless ComfyUI: it loads, lists its nodes, runs a graph, reports bad input."""

import subprocess
import sys

import facecond
from facecond_dev import host
from facecond_dev.client import PromptRejected


def test_quick_test_for_ci_loads_pack(tmp_path):
    base = host.prepare_base(tmp_path / "base", host.REPO, "any-name.v2")
    proc = subprocess.run(
        [sys.executable, "main.py", "--cpu", "--quick-test-for-ci", "--base-directory", str(base),
         "--disable-all-custom-nodes", "--whitelist-custom-nodes", "any-name.v2"],
        cwd=host.comfy_dir(), capture_output=True, text=True, timeout=300, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "IMPORT FAILED" not in out and "Cannot import" not in out, out[-4000:]
    assert "any-name.v2" in out  # ComfyUI's custom-node import-times listing names the pack


def test_object_info_lists_every_node(server):
    info = server.object_info()
    missing = sorted(set(facecond.NODE_CLASS_MAPPINGS) - set(info))
    assert not missing, f"nodes not registered by the server: {missing}"
    for node_id, display in facecond.NODE_DISPLAY_NAME_MAPPINGS.items():
        assert info[node_id]["display_name"] == display
        assert info[node_id]["category"].startswith("facecond")


def _txt2img(seed: int, width: int = 64) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": host.EXAMPLE_CKPT}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a person", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": seed, "steps": 2, "cfg": 7.5, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": f"smoke_{seed}"}},
    }


def test_bad_graph_is_reported_and_server_keeps_serving(server):
    bad = _txt2img(1)
    bad["5"]["inputs"]["steps"] = "many"
    try:
        server.queue(bad)
        raise AssertionError("a graph with a string for an INT input was accepted")
    except PromptRejected as e:
        assert "5" in e.details.get("node_errors", {}), e.details

    result = server.run(_txt2img(2))
    assert result.status == "success", result.error
    (png,) = server.output_images(result)
    assert png.is_file() and png.stat().st_size > 0
