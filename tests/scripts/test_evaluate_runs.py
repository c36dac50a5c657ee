"""scripts/evaluate.py: jobs identified by what makes their images, spread over two ComfyUI servers, killed and
resumed exactly; a changed setting generates anew; --score-only reports what was stored; in insightface mode the
report equals insightface's own FaceAnalysis recomputed from the saved images; FID/IS inputs are checked before
anything is generated."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from facecond_dev import host
from facecond_dev.txt2img import txt2img_workflow

ROOT = Path(__file__).resolve().parents[2]
REC = "models/insightface_testpack/mobilefacenet_128.onnx"
DET = "models/insightface_testpack/det_2.5g.onnx"
BASELINE = txt2img_workflow(title="positive prompt")  # a title with a space: named as "positive prompt.text"


def _run(args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-P", str(ROOT / "scripts" / "evaluate.py"), *args], check=False,
                          capture_output=True, text=True, timeout=1500, env=dict(os.environ, OMP_NUM_THREADS="1"), **kw)


@pytest.fixture(scope="module")
def two_servers(tmp_path_factory, comfy_base):
    d = tmp_path_factory.mktemp("two")
    servers = [host.ComfyServer(host.prepare_base(d / f"base{i}", ROOT, "facecond-pack.dev"),
                                pack_name="facecond-pack.dev").start() for i in (1, 2)]
    yield d, servers
    for s in servers:
        s.stop()


def _ids(d: Path, data: Path) -> Path:
    for name in ("John_Salley", "John_Savage"):
        (d / "ids" / name).mkdir(parents=True, exist_ok=True)
        for p in sorted((data / "faces" / "johns" / name).glob("*.jpg"))[:2]:
            shutil.copyfile(p, d / "ids" / name / p.name)
    return d / "ids"


def test_two_servers_killed_and_resumed_changed_settings_and_score_only(two_servers, shared_data):
    d, (a, b) = two_servers
    (d / "prompts.txt").write_text("a photo of {}\n{} as an astronaut\n")
    (d / "baseline.json").write_text(json.dumps(BASELINE))
    out = d / "out"

    def args(*extra, seeds="0-1", urls=(a.url, b.url), o=out):
        return ["--out", str(o), "--identities", str(_ids(d, shared_data)), "--prompts", str(d / "prompts.txt"),
                "--seeds", seeds, "--method", f"plain={d / 'baseline.json'} prompt='positive prompt.text'",
                "--quick", *[x for u in urls for x in ("--url", u)], "--recogniser", str(shared_data / REC),
                "--independent-recogniser", "none", "--no-face", "passthrough", "--aggregate", "face0", *extra]

    log = open(d / "run1.log", "w")
    proc = subprocess.Popen([sys.executable, "-P", str(ROOT / "scripts" / "evaluate.py"), *args()], stdout=log,
                            stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    ledger = out / "runs.jsonl"
    deadline = time.monotonic() + 900
    while proc.poll() is None and time.monotonic() < deadline:
        if ledger.exists() and len(ledger.read_text().splitlines()) >= 2:
            break
        time.sleep(0.1)
    assert proc.poll() is None, (d / "run1.log").read_text()[-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log.close()
    first = [json.loads(x) for x in ledger.read_text().splitlines()]
    done = {e["job"]: {f: (out / f).stat().st_mtime_ns for f in e["files"]} for e in first}
    assert 2 <= len(done) < 8

    run2 = _run(args())
    assert run2.returncode == 0, run2.stderr[-4000:]
    assert f"8 image job(s): {len(done)} done, {8 - len(done)} to go on 2 server(s)" in run2.stderr
    entries = [json.loads(x) for x in ledger.read_text().splitlines()]
    assert len(entries) == 8 == len({e["job"] for e in entries})  # nothing generated twice
    assert {e["server"] for e in entries} == {a.url, b.url}  # both servers took jobs
    for files in done.values():
        assert all((out / f).stat().st_mtime_ns == t for f, t in files.items())
    assert {e["prompt"] for e in entries} == {"a photo of a person", "a person as an astronaut"}

    # exact across servers: the same jobs run on the other server alone give byte-identical images
    run3 = _run(args(seeds="0", urls=(b.url,), o=d / "single"))
    assert run3.returncode == 0, run3.stderr[-4000:]
    single = {json.loads(x)["job"]: json.loads(x) for x in (d / "single" / "runs.jsonl").read_text().splitlines()}
    both = {e["job"]: e for e in entries}
    assert len(single) == 4 and set(single) <= set(both)
    for job, e in single.items():
        assert (d / "single" / e["files"][0]).read_bytes() == (out / both[job]["files"][0]).read_bytes()

    # a changed setting is new jobs with new images; the old ones are not relabelled
    run4 = _run(args("--set", "KSampler.steps=1", seeds="0"))
    assert run4.returncode == 0, run4.stderr[-4000:]
    assert "4 image job(s): 0 done, 4 to go on 2 server(s)" in run4.stderr
    summary = json.loads((out / "summary.json").read_text())["meta"]
    assert summary["settings"]["plain"]["steps"] == [1] and summary["seeds"] == [0]
    rows = list(csv.DictReader(open(out / "images.csv")))
    assert len(rows) == 4 and not {r["job"] for r in rows} & set(both)

    # --score-only scores the stored run, whatever prompts/seeds the command line names
    (d / "other.txt").write_text("a painting of {}\n")
    run5 = _run([*args(seeds="5-9"), "--score-only", "--prompts", str(d / "other.txt")])
    assert run5.returncode == 0, run5.stderr[-4000:]
    rows5 = list(csv.DictReader(open(out / "images.csv")))
    assert {r["job"] for r in rows5} == {r["job"] for r in rows}
    assert {r["prompt"] for r in rows5} == {"a photo of a person", "a person as an astronaut"}
    report = (out / "report.html").read_text()
    assert "4 images · 2 identities · 2 prompts · seeds [0] (best of 1)" in report
    assert "--set: KSampler.steps=1" in report and "--quick: True" in report


def _face_analysis(shared_data):
    if not host.data_required():
        pytest.importorskip("insightface", reason="insightface's FaceAnalysis is the reference")
    from insightface.app import FaceAnalysis

    root = Path(tempfile.mkdtemp(prefix="facecond-insightface-"))
    (root / "models").mkdir()
    (root / "models" / "insightface_testpack").symlink_to(shared_data / "models" / "insightface_testpack",
                                                         target_is_directory=True)
    app = FaceAnalysis(name="insightface_testpack", root=str(root), providers=["CPUExecutionProvider"])
    app.prepare(ctx_id=-1, det_size=(640, 640))
    return app


# one_host: --score-only starts no ComfyUI: scoring is pure torch / onnxruntime
@pytest.mark.one_host
def test_report_equals_face_analysis_in_insightface_mode(tmp_path, shared_data):
    """--score-only over stored images (real photos standing in for generated ones): every ID equals insightface
    2.1's FaceAnalysis (largest face, normed_embedding, mean cosine over the references) to 1e-5. The detector
    session is opened at FaceAnalysis's static 640 x 640 shape (`onnx_pack.make_session`); opened with dynamic
    shapes its landmarks were one float32 step off and the IDs 3.4e-5 apart."""
    app = _face_analysis(shared_data)

    def small(src: Path, dst: Path):
        dst.parent.mkdir(parents=True, exist_ok=True)
        im = Image.open(src).convert("RGB")
        im.thumbnail((320, 320), Image.Resampling.LANCZOS)
        im.save(dst)

    faces = shared_data / "faces"
    small(faces / "obama/obama2.jpg", tmp_path / "ids/obama/a.png")
    small(faces / "obama/obama3.jpg", tmp_path / "ids/obama/b.png")
    small(faces / "biden/biden.jpg", tmp_path / "ids/biden/a.png")
    out = tmp_path / "out"
    gens = [("obama", "obama/obama.jpg"), ("biden", "astronaut/astronaut.png"), ("obama", "biden/biden.jpg")]
    out.mkdir()
    with open(out / "runs.jsonl", "w") as f:
        for k, (ident, src) in enumerate(gens):
            small(faces / src, out / f"images/{k}.png")
            f.write(json.dumps({"job": f"j{k}", "method": "m", "identity": ident, "prompt_index": 0, "seed": k,
                                "prompt": "a photo", "files": [f"images/{k}.png"], "seconds_total": 1.0}) + "\n")
    run = _run(["--out", str(out), "--identities", str(tmp_path / "ids"), "--score-only", "--detector",
                str(shared_data / DET), "--recogniser", str(shared_data / REC), "--independent-recogniser", "none"])
    assert run.returncode == 0, run.stderr[-4000:]

    def emb(path):
        found = app.get(np.ascontiguousarray(np.asarray(Image.open(path).convert("RGB"))[:, :, ::-1]))
        return torch.from_numpy(max(found, key=lambda x: (x.bbox[2] - x.bbox[0]) * (x.bbox[3] - x.bbox[1]))
                                .normed_embedding.astype(np.float64))

    rows = list(csv.DictReader(open(out / "images.csv")))
    assert len(rows) == 3
    worst = 0.0
    for r in rows:
        refs = [emb(p) for p in sorted((tmp_path / "ids" / r["identity"]).iterdir())]
        want = float(torch.stack([emb(out / r["file"]) @ e for e in refs]).mean())
        assert float(r["id"]) == pytest.approx(want, abs=1e-5), r
        worst = max(worst, abs(float(r["id"]) - want))
    print(f"report vs FaceAnalysis: largest ID difference {worst:.2e}")
    meta = json.loads((out / "summary.json").read_text())["meta"]
    assert meta["judges"][0]["preprocess"] == "insightface"
    assert "preprocessing insightface" in (out / "report.html").read_text()


# one_host: the run ends before it asks any ComfyUI anything
@pytest.mark.one_host
def test_fid_inputs_are_checked_before_any_generation(tmp_path):
    (tmp_path / "ids/a").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "ids/a/x.png")
    (tmp_path / "real").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "real/x.png")
    bad = tmp_path / "notes.pth"
    bad.write_text("not weights\n")
    tensors = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(2, 2)}, tensors)
    (tmp_path / "p.txt").write_text("a photo of {}\n")
    (tmp_path / "plain.json").write_text(json.dumps(BASELINE))
    # nothing listens on the --url: the run must end before it would ask it anything
    base = ["--out", str(tmp_path / "out"), "--identities", str(tmp_path / "ids"), "--prompts", str(tmp_path / "p.txt"),
            "--method", str(tmp_path / "plain.json"), "--url", f"http://127.0.0.1:{host.free_port()}",
            "--fid-real", str(tmp_path / "real")]
    for weights, line in ((bad, "not a weights file that loads without running code"),
                          (tensors, "a state dict, but not torch-fidelity's InceptionV3"),
                          (tmp_path / "missing.pth", "not found")):
        run = _run([*base, "--inception-weights", str(weights)])
        assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
        last = run.stderr.strip().splitlines()[-1]
        assert last.startswith("evaluate.py: FID/IS: ") and line in last, last
        assert not (tmp_path / "out" / "runs.jsonl").exists()
