"""Face0 data preparation (py/train/face0_sources.py, face0_data.py, scripts/face0_prepare.py): shards, sources,
bad inputs, resume."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from facecond.py.train import face0_data as fd
from facecond.py.train import face0_sources as fs

ROOT = Path(__file__).resolve().parents[3]
RECOGNISER = "models/insightface_testpack/mobilefacenet_128.onnx"


def make_sources(shared_data: Path, folder: Path) -> Path:
    """Real photos with captions, plus a corrupt file, a faceless image and a photo without a caption."""
    folder.mkdir(parents=True)
    faces = shared_data / "faces"
    for i, src in enumerate([faces / "obama" / "obama.jpg", faces / "biden" / "biden.jpg",
                             *sorted((faces / "johns" / "John_Salley").iterdir())[:2]]):
        shutil.copy(src, folder / f"face{i}{src.suffix}")
        (folder / f"face{i}.txt").write_text(f"a photo of person {i}")
    shutil.copy(faces / "obama" / "obama2.jpg", folder / "nocaption.jpg")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    (folder / "corrupt.txt").write_text("broken")
    Image.new("RGB", (160, 120), (90, 120, 150)).save(folder / "blank.png")
    (folder / "blank.txt").write_text("a grey wall")
    return folder


def test_shard_roundtrip_and_plan(tmp_path):
    emb, box = torch.arange(4.0), torch.tensor([1.0, 2.0, 30.0, 40.0])
    img = Image.new("RGB", (100, 80), (255, 0, 0))
    fm = fd.FaceModel(None, None, "test-embedder", False)
    members = fd.encode_sample("000000007", img, "a caption", emb, box.numpy(), fm, "src.jpg", fd.PrepConfig(64))
    members["000000007.latent.safetensors"] = fd.latent_member(torch.ones(4, 8, 8))
    fd.write_tar(tmp_path / "s.tar", members)
    assert fd.shard_keys(tmp_path / "s.tar") == ["000000007"]
    [(key, group)] = list(fd.iter_shard(tmp_path / "s.tar"))
    s = fd.decode_sample(group)
    assert key == "000000007" and s["caption"] == "a caption" and s["embedder"] == "test-embedder"
    assert torch.equal(s["embedding"], emb) and torch.equal(s["latent"], torch.ones(4, 8, 8))
    # the box follows the resize (short side 80 -> 64, scale 0.8) and the centre crop (x offset 8)
    assert torch.allclose(s["box"], torch.tensor([1 * 0.8 - 8, 2 * 0.8, 30 * 0.8 - 8, 40 * 0.8]))
    assert [(r.start, r.stop) for r in fd.plan_shards(7, 3)] == [(0, 3), (3, 6), (6, 7)]
    assert fd.my_shards(5, 1, 2) == [1, 3]
    with pytest.raises(ValueError, match="shard-index"):
        fd.my_shards(5, 2, 2)
    # a WebDataset tar is itself a source
    assert [i.member for i in fs.tar_items(tmp_path / "s.tar")] == ["000000007.jpg"]


def test_csv_and_parquet_sources(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"")
    (tmp_path / "list.csv").write_text("path,caption\na.jpg,hello\nb.jpg,\n")
    items = fs.csv_items(tmp_path / "list.csv")
    assert [(Path(i.image).name, i.caption) for i in items] == [("a.jpg", "hello"), ("b.jpg", None)]
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="pip install pyarrow"):
            fs.parquet_items(tmp_path / "x.parquet")


# one_host: bad files, counts and resume are the CLI's own; its one ComfyUI call (VAE encode) runs on every host in
# tests/scripts/test_face0_train.py
@pytest.mark.one_host
def test_prepare_cli_counts_bad_files_and_resumes(shared_data, tmp_path):
    src = make_sources(shared_data, tmp_path / "src")
    out = tmp_path / "out"
    cmd = [sys.executable, "-P", str(ROOT / "scripts" / "face0_prepare.py"), str(src), "--out", str(out),
           "--face-model", str(shared_data / RECOGNISER), "--resolution", "64", "--shard-size", "4",
           "--detect-max-side", "512", "--workers", "2"]
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    assert rep["items"] == 7 and rep["shards"] == 2 and rep["shards_done"] == 2
    assert rep["skipped"] == {"corrupt_image": 1, "no_face": 1, "missing_caption": 1}
    assert rep["written"] == 4
    assert Path(rep["skipped_examples"]["no_face"][0]).name == "blank.png"
    samples = [fd.decode_sample(g) for p in sorted(out.glob("shard-*.tar")) for _, g in fd.iter_shard(p)]
    assert len(samples) == 4
    assert all(s["image"].shape == (64, 64, 3) and s["embedding"].shape == (128,) for s in samples)
    assert all(abs(float(s["embedding"].norm()) - 1) < 1e-4 for s in samples)  # insightface: L2-normalised
    # resumable: finished shards (their .json report exists) are not redone; a removed one is
    mtime = (out / "shard-000000.tar").stat().st_mtime_ns
    (out / "shard-000001.json").unlink()
    r = subprocess.run([*cmd[:-2], "--shard-index", "1", "--num-shards", "2"], check=False, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "shard-000000.tar").stat().st_mtime_ns == mtime
    assert json.loads((out / "report.json").read_text())["shards_done"] == 2
    with tarfile.open(out / "shard-000001.tar") as tf:
        assert {n.split(".", 1)[1] for n in tf.getnames()} == {"jpg", "txt", "face.safetensors"}
