"""Training survives the server: resume, cancel, kill -9, and no silent overwrite, through a real headless ComfyUI.

ComfyUI runs every node under ``torch.inference_mode()``; a resumed run used to fail there at the first Adam
step. Here a run cut short and resumed through the server must give the same MLP / TI vectors, bit for bit, as
an uninterrupted run with the same seed; a server killed with SIGKILL (its whole process group) while it trains
and saves every step must leave a complete pair of files (MLP + trainer state, one stamp), old or new, that a new
server resumes. Tiny checkpoint, 64 px, one photo, p = 8: seconds per run.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from facecond.py.weights import atomic
from facecond_dev import host
from facecond_dev.client import ComfyClient

PHOTO = "survive_face.jpg"


def _graph(trainer: str, **inputs) -> dict:
    g = {"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": host.EXAMPLE_CKPT}},
         "img": {"class_type": "LoadImage", "inputs": {"image": PHOTO}}}
    common = {"model": ["ckpt", 0], "clip": ["ckpt", 1], "vae": ["ckpt", 2], "prompt_templates": "a photo of {}",
              "learning_rate": 0.01, "seed": 3, "augment": True, "resolution": 64, "resume": False,
              "checkpoint_every": 1, "overwrite": False}
    if trainer == "celeb":
        g |= {"det": {"class_type": "FacecondFaceDetectCrop", "inputs": {
                  "image": ["img", 0], "detector": f"{host.TEST_PACK}/det_2.5g.onnx", "select": "largest",
                  "face_index": 0, "min_size": 40, "margin_scale": 1.0, "upright": "off", "no_face": "error"}},
              "emb": {"class_type": "FacecondFaceEmbed", "inputs": {
                  "faces": ["det", 0], "model": host.STAND_IN_RECOGNISER, "facenet_layer": "bottleneck_512",
                  "normalize": "auto"}},
              "t": {"class_type": "FacecondTrainCelebBasis", "inputs": common | {
                  "images": ["det", 3], "face_embeds": ["emb", 0], "identities": "", "p": 8} | inputs}}
    else:
        g["t"] = {"class_type": "FacecondTrainFaceTI", "inputs": common | {
            "images": ["img", 0], "init": "face", "num_vectors": 2, "reparam": "log_norm_e"} | inputs}
    return g | {"out": {"class_type": "PreviewAny", "inputs": {"source": ["t", 2]}}}


def _report(result) -> str:
    return result.outputs["out"]["text"][0]


TRAINING_TIMEOUT = 1800  # seconds a training prompt may take on a loaded CI machine (a 16-step run takes seconds)


def _ok(server, prompt) -> str:
    result = server.run(prompt, timeout=TRAINING_TIMEOUT)
    assert result.status == "success", (result.error or {}).get("exception_message", result.error)
    return _report(result)


@pytest.fixture(scope="module")
def survive_server(server, shared_data):
    return host.stage_server(server, {PHOTO: shared_data / "faces" / "obama" / "obama.jpg"})


def _mlp_dir(base) -> Path:
    return Path(base) / "models" / "facecond" / "celebbasis"


@pytest.mark.parametrize("trainer", ["celeb", "ti"])
def test_resume_through_server_equals_uninterrupted_run(survive_server, trainer):
    server = survive_server
    _ok(server, _graph(trainer, steps=4, save_name=f"srv_full_{trainer}"))
    _ok(server, _graph(trainer, steps=2, save_name=f"srv_part_{trainer}"))
    report = _ok(server, _graph(trainer, steps=4, save_name=f"srv_part_{trainer}", resume=True))
    assert "4 steps" in report, report
    if trainer == "celeb":
        full, part = (load_file(_mlp_dir(server.base_dir) / f"srv_{k}_celeb.safetensors") for k in ("full", "part"))
    else:
        emb = Path(server.base_dir) / "models" / "embeddings"
        full, part = (load_file(emb / f"srv_{k}_ti.safetensors") for k in ("full", "part"))
    assert full.keys() == part.keys()
    for k in full:
        assert torch.equal(full[k], part[k]), k


def test_cancel_keeps_the_run_and_resume_finishes_it(survive_server):
    """ComfyUI's interrupt (POST /interrupt -> interrupt_current_processing) mid-run: the pair is kept at the last
    finished step and the log says how to resume; resuming gives the uninterrupted result."""
    server = survive_server
    _ok(server, _graph("celeb", steps=16, save_name="srv_cancel_full", checkpoint_every=0))
    state = _mlp_dir(server.base_dir) / "srv_cancel.state.safetensors"
    pid = server.queue(_graph("celeb", steps=16, save_name="srv_cancel"))
    deadline = time.monotonic() + TRAINING_TIMEOUT
    while atomic.pair_stamp(state) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    server._request("/interrupt", {})
    result = server.wait(pid, timeout=TRAINING_TIMEOUT)
    stopped = json.loads(atomic.pair_stamp(state))["step"]
    assert atomic.recover_pair([str(state).replace(".state", ""), str(state)]) == "ok"
    if stopped < 16:  # the interrupt came in time (on a very fast machine the run may finish first)
        assert result.status != "success"
        assert "resume=true and save_name='srv_cancel'" in server.process.log_tail(20000)
    _ok(server, _graph("celeb", steps=16, save_name="srv_cancel", resume=True))
    full, resumed = (load_file(_mlp_dir(server.base_dir) / f"{n}.safetensors") for n in ("srv_cancel_full",
                                                                                         "srv_cancel"))
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_overwrite_policy_numbers_new_runs(survive_server):
    server = survive_server
    r1 = _ok(server, _graph("ti", steps=1, save_name="srv_policy"))
    r2 = _ok(server, _graph("ti", steps=1, save_name="srv_policy", seed=4))
    assert "embedding:srv_policy;" not in r2 and "embedding:srv_policy_00001" in r2, (r1, r2)
    emb = Path(server.base_dir) / "models" / "embeddings"
    first = load_file(emb / "srv_policy.safetensors")
    assert not all(torch.equal(first[k], load_file(emb / "srv_policy_00001.safetensors")[k]) for k in first)
    r3 = _ok(server, _graph("ti", steps=1, save_name="srv_policy", seed=4, overwrite=True))
    assert "embedding:srv_policy;" in r3 or r3.endswith("embedding:srv_policy"), r3
    assert not (emb / "srv_policy_00002.safetensors").exists()


def _pair_files(base, name):
    d = _mlp_dir(base)
    return [str(d / f"{name}.safetensors"), str(d / f"{name}.state.safetensors")]


def _pair_on_disk(paths) -> tuple[str | None, str | None, bool]:
    """(stamp of each file, whether a complete .partial is waiting): what a kill left, before any recovery."""
    stamps = [atomic.pair_stamp(p) for p in paths]
    partial = any(atomic.pair_stamp(p + atomic.PARTIAL) is not None for p in paths)
    return stamps[0], stamps[1], partial


def test_sigkill_mid_training_and_mid_save_leaves_a_complete_pair(tmp_path, shared_data):
    """A server of its own, saving every step, killed with SIGKILL at several moments; after each kill the files
    are one complete pair (or a new pair whose last rename the next read finishes), and a new server resumes it
    to the same MLP as an uninterrupted run."""
    base = host.prepare_base(tmp_path / "base", host.REPO, "facecond-kill.dev")
    host.copy_inputs(base, {PHOTO: shared_data / "faces" / "obama" / "obama.jpg"})
    host.install_stand_in_models(base)
    paths = _pair_files(base, "killed")
    steps = 30
    seen = []
    for delay in (0.0, 0.37, 0.81):
        srv = host.ComfyServer(base, pack_name="facecond-kill.dev")
        srv.start()
        try:
            client = ComfyClient(srv.url, base)
            client.queue(_graph("celeb", steps=steps, save_name="killed", resume=True))
            deadline = time.monotonic() + TRAINING_TIMEOUT
            before = atomic.pair_stamp(paths[1])
            while atomic.pair_stamp(paths[1]) == before and time.monotonic() < deadline:
                time.sleep(0.01)  # a new checkpoint is on disk: the run is saving every step now
            time.sleep(delay)
        finally:
            os.killpg(srv.proc.pid, signal.SIGKILL)
            srv.proc.wait(30)
        a, b, partial = _pair_on_disk(paths)
        assert a is not None and b is not None, "a file of the pair is missing or truncated"
        assert a == b or partial, f"mismatched pair after kill: {a} vs {b}"
        assert atomic.recover_pair(paths) == "ok"
        assert not any(os.path.exists(p + atomic.PARTIAL) for p in paths)
        seen.append(json.loads(atomic.pair_stamp(paths[1]))["step"])
        assert load_file(paths[0])["weight"].shape == (16, 128)
    assert seen == sorted(seen), seen
    srv = host.ComfyServer(base, pack_name="facecond-kill.dev")
    with srv:
        client = ComfyClient(srv.url, base)
        _ok(client, _graph("celeb", steps=steps, save_name="killed", resume=True))
        _ok(client, _graph("celeb", steps=steps, save_name="unbroken", checkpoint_every=0))
    killed, unbroken = (load_file(_mlp_dir(base) / f"{n}.safetensors") for n in ("killed", "unbroken"))
    assert all(torch.equal(killed[k], unbroken[k]) for k in killed)
