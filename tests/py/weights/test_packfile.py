"""py/weights/packfile.py and the loaders built on it: every broken file is one PackFileError with the path,
the problem, expected vs found and the fix; pickles are never unpickled."""

from __future__ import annotations

import os
import pickle
import struct
import zipfile

import pytest
import torch
from safetensors.torch import save_file

from facecond.py.celebbasis.coeffs import load_coeffs, load_mlp
from facecond.py.face0.embeds_io import load_embeds, save_embeds
from facecond.py.face0.projection import ProjectionInfo, load_projection, random_projection, save_projection
from facecond.py.faces.types import FaceEmbeds
from facecond.py.ipadapter.adapter import read_file
from facecond.py.ipadapter.aggregate import SelfAttentionAggregator, load_aggregator, save_aggregator
from facecond.py.weights import packfile
from facecond.py.weights.manifest import load_state_dict


class WriteMarker:
    """Unpickling this creates the marker file (what an attacker's payload would do, harmlessly)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def good_embeds(tmp_path):
    path = tmp_path / "good.safetensors"
    save_embeds(FaceEmbeds(torch.arange(8.0).view(2, 4), "test/e", False, (0, 1)), path)
    return path


def _bad_files(tmp_path, good) -> dict[str, tuple]:
    data = good.read_bytes()
    marker = tmp_path / "MARKER"
    files = {
        "empty": (b"", "empty"),
        "truncated_header": (data[:20], "truncated"),
        "truncated_data": (data[:-5], "truncated"),
        "random": (bytes(range(7, 250, 3)) * 40, "not_safetensors"),
        "text": (b"this is a text file, not weights\n", "not_safetensors"),
        "pickle": (pickle.dumps(WriteMarker(marker), protocol=2), "pickle"),
        "tiny": (b"\x01\x02", "truncated"),
        "bad_json": (struct.pack("<Q", 4) + b"{abc", "not_safetensors"),
        "bad_offsets": (struct.pack("<Q", 2) + b"{}" + b"x", "not_safetensors"),
    }
    torch.save(WriteMarker(marker), tmp_path / "zip.tmp")
    files["torch_zip"] = ((tmp_path / "zip.tmp").read_bytes(), "pickle")
    return files


def test_each_broken_file_is_classified_and_nothing_is_unpickled(tmp_path, good_embeds):
    for name, (content, problem) in _bad_files(tmp_path, good_embeds).items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(content)
        with pytest.raises(packfile.PackFileError) as info:
            load_embeds(path)
        e = info.value
        assert (name, e.problem) == (name, problem), str(e)
        assert str(path) in str(e) and e.fix in str(e) and "SaveFaceEmbeds" in str(e), str(e)
        assert "header too large" not in str(e)
    assert not (tmp_path / "MARKER").exists()


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(packfile.PackFileError, match="no such file") as info:
        load_embeds(tmp_path / "nope.safetensors")
    assert info.value.problem == "missing"
    with pytest.raises(packfile.PackFileError, match="is a folder"):
        packfile.read(tmp_path)


def test_truncated_data_says_how_many_bytes(good_embeds, tmp_path):
    size = good_embeds.stat().st_size
    (tmp_path / "t.safetensors").write_bytes(good_embeds.read_bytes()[:-5])
    with pytest.raises(packfile.PackFileError, match=f"expected {size} bytes; found {size - 5} bytes"):
        load_embeds(tmp_path / "t.safetensors")


def test_wrong_kind_names_both_kinds(good_embeds, tmp_path):
    with pytest.raises(packfile.PackFileError, match=r"not a Face0 projection \(expected facecond.kind="
                       r"'face0_projection'; found facecond.kind='face_embeds' \(a face-embeddings file\)\)") as info:
        load_projection(good_embeds)
    assert info.value.problem == "wrong_kind" and "scripts/face0_train.py" in str(info.value)
    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    for loader in (load_embeds, load_coeffs, load_mlp):
        with pytest.raises(packfile.PackFileError, match=r"no facecond\.kind metadata"):
            loader(tmp_path / "plain.safetensors")


def test_wrong_shapes_give_expected_and_found(tmp_path):
    info = ProjectionInfo(embedder="test/e", embed_dim=8, context_dim=16, hidden=16)
    path = tmp_path / "p.safetensors"
    save_projection(random_projection(info), path)
    meta = info.to_metadata() | {"embed_dim": "12"}  # the tensors say 8
    tensors = {k: v.contiguous() for k, v in random_projection(info).state_dict().items()}
    save_file(tensors, str(tmp_path / "lie.safetensors"), metadata=meta)
    with pytest.raises(packfile.PackFileError, match=r"do not match its metadata .*expected .*'mlp.0.weight': "
                       r"\(16, 12\).*found .*'mlp.0.weight': \(16, 8\)") as e:
        load_projection(tmp_path / "lie.safetensors")
    assert e.value.problem == "wrong_shape"
    save_file({"embeds": torch.zeros(3)}, str(tmp_path / "e.safetensors"), metadata={"facecond.kind": "face_embeds"})
    with pytest.raises(packfile.PackFileError, match=r"non-empty \(N, D\).*found \{'embeds': \(3,\)\}"):
        load_embeds(tmp_path / "e.safetensors")
    save_file({"coeffs": torch.zeros(2, 5)}, str(tmp_path / "c.safetensors"),
              metadata={"facecond.kind": "celeb_coeffs", "p": "4", "table_hash": "t", "names_hash": "n"})
    with pytest.raises(packfile.PackFileError, match=r"expected 'coeffs' \(2, 4\); found \{'coeffs': \(2, 5\)\}"):
        load_coeffs(tmp_path / "c.safetensors")
    save_file({"coeffs": torch.zeros(2, 4)}, str(tmp_path / "m.safetensors"),
              metadata={"facecond.kind": "celeb_coeffs"})
    with pytest.raises(packfile.PackFileError, match="malformed Celeb Basis coefficients file metadata"):
        load_coeffs(tmp_path / "m.safetensors")


def test_aggregator_and_adapter_files(tmp_path, good_embeds):
    agg = SelfAttentionAggregator(8, 3)
    save_aggregator(agg, tmp_path / "a.safetensors")
    assert load_aggregator(tmp_path / "a.safetensors").dim == 8
    with pytest.raises(packfile.PackFileError, match="not a self-attention aggregator") as info:
        load_aggregator(good_embeds)
    assert "scripts/train_aggregator.py" in str(info.value)
    sd = {k: v.clone() for k, v in agg.state_dict().items()}
    sd["k.weight"] = torch.zeros(8, 6)
    save_file(sd, str(tmp_path / "w.safetensors"))
    with pytest.raises(packfile.PackFileError, match="do not make one aggregator") as info:
        load_aggregator(tmp_path / "w.safetensors")
    assert info.value.problem == "wrong_shape"
    (tmp_path / "ip.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(packfile.PackFileError, match=r"not a safetensors file.*IP-Adapter"):
        read_file(tmp_path / "ip.safetensors")


def test_torch_files_are_checked_before_torch_load(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "ok.bin")
    assert torch.equal(load_state_dict(tmp_path / "ok.bin")["w"], torch.ones(2))
    data = (tmp_path / "ok.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.bin").write_bytes(b"")
    (tmp_path / "text.bin").write_bytes(b"hello")
    for name, problem in (("cut", "truncated"), ("empty", "empty"), ("text", "not_safetensors")):
        with pytest.raises(packfile.PackFileError) as info:
            load_state_dict(tmp_path / f"{name}.bin")
        assert info.value.problem == problem and str(tmp_path / f"{name}.bin") in str(info.value)
    assert zipfile.is_zipfile(tmp_path / "ok.bin") and os.path.getsize(tmp_path / "ok.bin") > 0


def test_safetensors_whose_header_length_starts_like_a_pickle_is_read(tmp_path):
    """A header of 0x0380 = 896 bytes makes the file start with 80 03, a pickle's protocol-3 opening: the reader
    must take the safetensors reading (the length fits the file and the header starts with '{')."""
    path = tmp_path / "p.safetensors"
    save_file({"x": torch.arange(6, dtype=torch.float32)}, str(path), metadata={"facecond.kind": "face_embeds"})
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header, data = raw[8:8 + n].rstrip(b" "), raw[8 + n:]
    padded = header + b" " * (0x380 - len(header))  # safetensors allows trailing spaces in the header
    path.write_bytes(struct.pack("<Q", 0x380) + padded + data)
    assert path.read_bytes()[:2] == b"\x80\x03"
    meta, tensors = packfile.read(path, kind="face_embeds")
    assert meta["facecond.kind"] == "face_embeds"
    assert torch.equal(tensors["x"], torch.arange(6, dtype=torch.float32))


def test_out_of_memory_is_told_apart_from_a_bad_file():
    try:
        torch.empty(2**50, dtype=torch.uint8)  # a real CPU allocation failure
    except RuntimeError as e:
        cpu = e
    assert packfile.out_of_memory(cpu) and packfile.out_of_memory(MemoryError())
    assert packfile.out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not packfile.out_of_memory(RuntimeError("Error(s) in loading state_dict: size mismatch"))
    assert not packfile.out_of_memory(ValueError("header too large"))
