"""scripts/evaluate.py end to end through a real headless ComfyUI on the tiny checkpoint: 2 identities x 2 prompts x
2 seeds x 2 workflows (Face0's UI-format example and an API-format plain txt2img baseline bound by node title),
killed mid-run and resumed without regenerating finished images, and a report whose numbers equal those
recomputed from the saved images (real insightface test recogniser, tiny random-weight CLIPModel). Then the ways a
run ends early: its ComfyUI server killed mid-run (one line, status 1, the rerun resumes), a URL that is a plain
HTTP server and not ComfyUI, and --method files that are not workflows."""

from __future__ import annotations

import csv
import functools
import http.server
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from facecond.py.evaluate import clip_score, identity
from facecond.py.faces import detect, embed
from facecond.py.weights import manifest
from facecond_dev import host
from facecond_dev.client import ComfyClient, ServerGone
from facecond_dev.tiny_clip import write_tiny_clip
from facecond_dev.txt2img import txt2img_workflow

ROOT = Path(__file__).resolve().parents[2]
REC = "models/insightface_testpack/mobilefacenet_128.onnx"

BASELINE = txt2img_workflow("{prompt}, high quality")  # API format; the prompt node is found by its title


@pytest.fixture(scope="module")
def setup(tmp_path_factory, shared_data, comfy_base):
    d = tmp_path_factory.mktemp("evaluate")
    johns = shared_data / "faces" / "johns"
    for name in ("John_Salley", "John_Savage"):
        (d / "ids" / name).mkdir(parents=True)
        for p in sorted((johns / name).glob("*.jpg"))[:2]:
            shutil.copyfile(p, d / "ids" / name / p.name)
    (d / "prompts.txt").write_text("# two prompts\na photo of {}\n{} as an astronaut\n")
    (d / "baseline.json").write_text(json.dumps(BASELINE))
    write_tiny_clip(d / "clip" / "tiny")
    return d


def _cmd(d: Path, data: Path) -> list[str]:
    return [sys.executable, "-P", str(ROOT / "scripts" / "evaluate.py"), "--out", str(d / "out"),
            "--identities", str(d / "ids"), "--prompts", str(d / "prompts.txt"), "--seeds", "0-1",
            "--method", "face0=" + str(ROOT / "example_workflows" / "face0_single_photo.json"),
            "--method", f"plain={d / 'baseline.json'} prompt=positive_prompt.text", "--stand-ins", "--quick",
            "--recogniser", str(data / REC), "--clip-model", str(d / "clip" / "tiny"), "--no-face", "passthrough",
            "--aggregate", "face0", "--independent-recogniser", "none"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()


# one_host: the harness's server calls (queue, history, view, kill and resume) run on every host in
# test_evaluate_runs.py::test_two_servers_killed_and_resumed...; what this adds (recomputing the report) is
# host-independent
@pytest.mark.one_host
def test_evaluate_runs_resumes_and_reports_recomputable_numbers(setup, shared_data):
    d, out = setup, setup / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    log1 = open(d / "run1.log", "w")
    proc = subprocess.Popen(_cmd(d, shared_data), stdout=log1, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    ledger = out / "runs.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if ledger.exists() and len(ledger.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, (d / "run1.log").read_text()[-3000:]
    os.kill(proc.pid, signal.SIGKILL)  # no chance to clean up: its ComfyUI is left running
    proc.wait()
    log1.close()
    server_pid = int((out / "comfyui.pid").read_text().split()[0])
    first = [json.loads(x) for x in ledger.read_text().splitlines()]
    done = {e["job"]: {f: (out / f).stat().st_mtime_ns for f in e["files"]} for e in first}
    assert 3 <= len(done) < 16

    try:
        run2 = subprocess.run(_cmd(d, shared_data), check=False, capture_output=True, text=True,
                              timeout=400, env=env)
    finally:
        if _alive(server_pid):
            os.killpg(server_pid, signal.SIGKILL)
    assert run2.returncode == 0, run2.stderr[-4000:]
    assert f"16 image job(s): {len(done)} done, {16 - len(done)} to go" in run2.stderr
    assert "stopping the ComfyUI" in run2.stderr and not _alive(server_pid)
    entries = [json.loads(x) for x in ledger.read_text().splitlines()]
    assert len(entries) == 16 and len({e["job"] for e in entries}) == 16  # nothing generated twice
    for key, files in done.items():
        for f, mtime in files.items():
            assert (out / f).stat().st_mtime_ns == mtime, f"{key}: {f} was regenerated"
    assert all(e["seconds_sampling"] and 0 < e["seconds_sampling"] <= e["seconds_total"] for e in entries)

    # every number of the report recomputed from the saved images
    rows = list(csv.DictReader(open(out / "images.csv")))
    assert len(rows) == 16 and {r["method"] for r in rows} == {"face0", "plain"}
    assert {r["prompt"] for r in rows} == {"a photo of a person", "a person as an astronaut"}
    assert all(Image.open(out / r["file"]).size == (64, 64) for r in rows)
    det = detect.MTCNN(*(manifest.package_file(manifest.get_entry(f"mtcnn_{n}")) for n in ("pnet", "rnet", "onet")))
    rec = embed.load_onnx_recogniser(shared_data / REC)
    scorer = clip_score.ClipScorer(d / "clip" / "tiny")
    load = lambda p: np.asarray(Image.open(p).convert("RGB"), np.float32) / 255.0  # noqa: E731
    refs = {n: [load(p) for p in sorted((d / "ids" / n).iterdir())] for n in ("John_Salley", "John_Savage")}
    recomputed = {}
    for r in rows:
        img = load(out / r["file"])
        ids = identity.score_images(img[None], refs[r["identity"]], det, rec, no_face="passthrough",
                                    preprocess="insightface")
        cos = float(scorer.cosines(torch.from_numpy(img[None]), [r["prompt"]])[0])
        assert float(r["id"]) == pytest.approx(ids.scores[0], abs=1e-6)
        assert float(r["clip"]) == pytest.approx(cos, abs=1e-6)
        assert float(r["aggregate"]) == pytest.approx(cos + ids.scores[0], abs=1e-6)
        assert r["has_face"] == str(ids.has_face[0])
        recomputed.setdefault(r["method"], []).append((r["identity"], r["prompt_index"], cos + ids.scores[0]))
    summary = json.loads((out / "summary.json").read_text())["methods"]
    for method, vals in recomputed.items():
        best = {}
        for ident, pi, v in vals:
            best[(ident, pi)] = max(best.get((ident, pi), -math.inf), v)
        s = summary[method]
        assert s["images"] == 8 and s["seeds_per_prompt"] == 2
        assert s["aggregate_mean"] == pytest.approx(sum(v for *_, v in vals) / 8, abs=1e-6)
        assert s["aggregate_best"] == pytest.approx(sum(best.values()) / 4, abs=1e-6)
    report = (out / "report.html").read_text()
    assert "face0" in report and "plain" in report and "John_Savage" in report
    assert (out / "plots.png").stat().st_size > 5000
    assert report.count("<img class=t") == 16


def _run(args: list[str], env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-P", str(ROOT / "scripts" / "evaluate.py"), *args], check=False,
                          capture_output=True, text=True, timeout=600, env=env)


def _plain_cmd(d: Path, data: Path, out: Path, url: str, method: str | None = None) -> list[str]:
    """The API-format baseline alone against a running server (no face models needed to generate)."""
    method = method or f"plain={d / 'baseline.json'} prompt=positive_prompt.text"
    return ["--out", str(out), "--identities", str(d / "ids"), "--prompts", str(d / "prompts.txt"), "--seeds", "0-2",
            "--method", method, "--quick", "--url", url,
            "--recogniser", str(data / REC), "--no-face", "passthrough", "--aggregate", "face0",
            "--independent-recogniser", "none", "--request-timeout", "600", "--retries", "2"]


# one_host: a killed server and a resume run on every host in
# test_evaluate_runs.py::test_two_servers_killed_and_resumed...; this adds the one-line message
@pytest.mark.one_host
def test_a_server_killed_mid_run_ends_it_with_one_line_and_the_rerun_resumes(setup, shared_data, tmp_path):
    """A real ComfyUI killed (SIGKILL) while evaluate.py waits on it: one line naming the server and the resume,
    status 1, no traceback; the rerun against a new server on the same base finishes only what was missing."""
    d, out = setup, tmp_path / "out"
    base = host.prepare_base(tmp_path / "base", ROOT, "facecond-pack.dev")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    srv = host.ComfyServer(base, pack_name="facecond-pack.dev").start()
    try:
        log = open(tmp_path / "run1.log", "w")
        proc = subprocess.Popen([sys.executable, "-P", str(ROOT / "scripts" / "evaluate.py"),
                                 *_plain_cmd(d, shared_data, out, srv.url)], stdout=subprocess.DEVNULL, stderr=log,
                                env=env)
        ledger = out / "runs.jsonl"
        while proc.poll() is None and not (ledger.exists() and ledger.read_text().strip()):
            time.sleep(0.1)
        assert proc.poll() is None, (tmp_path / "run1.log").read_text()[-3000:]
        os.killpg(srv.proc.pid, signal.SIGKILL)  # the server dies while evaluate.py waits on it
        srv.proc.wait()
        assert proc.wait(timeout=600) == 1
    finally:
        srv.stop()
    log.close()
    err = (tmp_path / "run1.log").read_text()
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(rf"evaluate\.py: the ComfyUI server at {re.escape(srv.url)} stopped answering \(.+\); "
                        r"rerun with the same --out to resume", last), err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    done = len(ledger.read_text().splitlines())
    assert 1 <= done < 12

    srv2 = host.ComfyServer(base, pack_name="facecond-pack.dev").start()
    try:
        run2 = _run(_plain_cmd(d, shared_data, out, srv2.url), env)
    finally:
        srv2.stop()
    assert run2.returncode == 0, run2.stderr[-4000:]
    assert f"12 image job(s): {done} done, {12 - done} to go" in run2.stderr
    keys = [json.loads(x)["job"] for x in ledger.read_text().splitlines()]
    assert len(keys) == 12 == len(set(keys))


@pytest.fixture
def not_comfyui(tmp_path):
    """A plain http.server on 127.0.0.1 (not ComfyUI): /object_info is 404, /html/object_info an HTML page."""
    (tmp_path / "site" / "html" / "object_info").mkdir(parents=True)
    (tmp_path / "site" / "html" / "object_info" / "index.html").write_text("<html><body>Hello</body></html>")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(tmp_path / "site"))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_a_url_that_is_not_comfyui_and_files_that_are_not_workflows_end_with_one_line(setup, shared_data,
                                                                                      not_comfyui, tmp_path):
    d = setup
    (tmp_path / "notes.json").write_text("these are notes, not JSON\n")
    (tmp_path / "settings.json").write_text(json.dumps({"theme": "dark", "nodes": "many"}))
    dead = f"http://127.0.0.1:{host.free_port()}"  # nothing listens there

    def cmd(url, method=None):
        return _plain_cmd(d, shared_data, tmp_path / "out", url, method)

    cases = [
        (cmd(not_comfyui), f"evaluate.py: {not_comfyui} is not a ComfyUI server: GET /object_info answered HTTP 404"),
        (cmd(not_comfyui + "/html"), f"evaluate.py: {not_comfyui}/html is not a ComfyUI server: GET /object_info "
                                     "answered text/html (b'<html><body>Hello"),
        (cmd(dead), f"evaluate.py: no ComfyUI server answers at {dead} (connection refused)"),
        (cmd(not_comfyui, str(tmp_path / "notes.json")), f"evaluate.py: {tmp_path / 'notes.json'} is not a ComfyUI "
                                                          "workflow: it is not JSON (Expecting value at line 1"),
        (cmd(not_comfyui, str(tmp_path / "settings.json")), f"evaluate.py: {tmp_path / 'settings.json'} is JSON but "
                                                             "not a ComfyUI workflow (an object with keys ['nodes', "
                                                             "'theme']): expected a UI workflow"),
        (cmd(not_comfyui, str(tmp_path / "missing.json")), f"evaluate.py: workflow {tmp_path / 'missing.json'} "
                                                            "cannot be read: no such file or directory"),
    ]
    for args, line in cases:
        run = _run(args)
        assert run.returncode == 1 and "Traceback" not in run.stderr, (args, run.stderr[-3000:])
        assert run.stderr.strip().splitlines()[-1].startswith(line), (line, run.stderr[-1000:])


def test_status_polls_of_a_dead_server_are_retried_then_end_in_server_gone():
    url = f"http://127.0.0.1:{host.free_port()}"  # nothing listens there
    with pytest.raises(ServerGone, match=rf"^the ComfyUI server at {re.escape(url)} stopped answering \(connection "
                       r"refused\)$"):
        ComfyClient(url, retries=1).wait("some-prompt-id", timeout=600)
