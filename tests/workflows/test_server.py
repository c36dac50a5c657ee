"""The pack in a real headless ComfyUI: it loads, lists its nodes, runs a graph, reports bad input."""

import subprocess
import sys

import facecond
from facecond_dev import host
from facecond_dev.client import PromptRejected, ui_to_api, widget_default


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


def test_prompt_with_one_failing_output_is_reported_failed(server):
    """ComfyUI queues the outputs that validate and answers 200 with ``node_errors`` for the others; the client
    reports that as a failure naming the node, not as a queued prompt."""
    prompt = _txt2img(3)
    broken = _txt2img(4)
    broken["5"]["inputs"]["steps"] = "many"
    prompt.update({f"1{k}": {"class_type": n["class_type"],
                             "inputs": {i: [f"1{v[0]}", v[1]] if isinstance(v, list) else v
                                        for i, v in n["inputs"].items()}}
                   for k, n in broken.items()})  # a second, broken chain: nodes 11..17, KSampler 15
    try:
        server.queue(prompt)
        raise AssertionError("a prompt with a broken output was reported as queued")
    except PromptRejected as e:
        assert sorted(e.details["node_errors"]) == ["15"], e.details
        assert "15 (KSampler)" in str(e)
        partial = e.details["prompt_id"]  # what the server did queue: the good chain only
    result = server.wait(partial)
    assert result.status == "success" and sorted(result.outputs) == ["7"], result.outputs


def test_ui_to_api_fills_missing_widgets_with_schema_defaults(server):
    """A workflow saved before a node gained widgets has fewer widget values; the front end fills the rest with
    the schema's defaults (a combo without one: its first choice), and so does ui_to_api."""
    info = server.object_info()
    workflow = {"nodes": [
        {"id": 1, "type": "CheckpointLoaderSimple", "inputs": [], "widgets_values": [host.EXAMPLE_CKPT]},
        {"id": 2, "type": "EmptyLatentImage", "inputs": [], "widgets_values": [64]},  # height, batch_size missing
        {"id": 3, "type": "KSampler", "widgets_values": [5, "fixed", 2],  # cfg .. denoise missing
         "inputs": [{"name": n, "link": i}
                    for i, n in enumerate(("model", "positive", "negative", "latent_image"), 1)]},
        {"id": 4, "type": "CLIPTextEncode", "inputs": [{"name": "clip", "link": 5}], "widgets_values": ["a face"]},
    ], "links": [[1, 1, 0, 3, 0, "MODEL"], [2, 4, 0, 3, 1, "CONDITIONING"], [3, 4, 0, 3, 2, "CONDITIONING"],
                 [4, 2, 0, 3, 3, "LATENT"], [5, 1, 1, 4, 0, "CLIP"]]}
    prompt = ui_to_api(workflow, info)
    assert prompt["2"]["inputs"] == {"width": 64, "height": 512, "batch_size": 1}
    ks = prompt["3"]["inputs"]
    assert (ks["seed"], ks["steps"], ks["cfg"], ks["denoise"]) == (5, 2, 8.0, 1.0)
    req = info["KSampler"]["input"]["required"]
    assert ks["sampler_name"] == req["sampler_name"][0][0] == "euler"  # no default: the first choice
    assert ks["scheduler"] == req["scheduler"][0][0]
    assert ks["model"] == ["1", 0] and ks["latent_image"] == ["2", 0]
    assert widget_default("INT", {}, None) == 0 and widget_default("COMBO", {}, ["a", "b"]) == "a"
