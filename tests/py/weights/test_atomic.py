"""py/weights/atomic.py: atomic writes, file pairs that change together, numbered names."""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file

from facecond.py.weights import atomic


def test_save_file_replaces_whole_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "a.safetensors"
    atomic.save_file({"x": torch.ones(3)}, path, {"k": "1"})
    atomic.save_file({"x": torch.zeros(5)}, path, {"k": "2"})
    assert torch.equal(load_file(path)["x"], torch.zeros(5))
    assert atomic.header_metadata(path) == {"k": "2"}
    assert os.listdir(tmp_path) == ["a.safetensors"]


def test_failed_write_keeps_old_file(tmp_path):
    path = tmp_path / "a.safetensors"
    atomic.save_file({"x": torch.ones(3)}, path)

    try:  # a write that dies half-way (a non-bytes object makes f.write raise after the temp file exists)
        atomic.write_bytes(path, object())
    except TypeError:
        pass
    assert torch.equal(load_file(path)["x"], torch.ones(3))
    assert os.listdir(tmp_path) == ["a.safetensors"]


def test_header_metadata_refuses_truncated_file(tmp_path):
    path = tmp_path / "a.safetensors"
    atomic.save_file({"x": torch.ones(100)}, path, {"k": "v"})
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    assert atomic.header_metadata(path) is None
    path.write_bytes(data[:5])
    assert atomic.header_metadata(path) is None
    assert atomic.header_metadata(tmp_path / "missing") is None


def _pair(tmp_path):
    return [str(tmp_path / "m.safetensors"), str(tmp_path / "m.state.safetensors")]


def _commit(paths, value, stamp):
    atomic.commit_pair([(p, {"x": torch.full((4,), float(value))}, {}) for p in paths], stamp)


def test_pair_commit_and_recover(tmp_path):
    paths = _pair(tmp_path)
    assert atomic.recover_pair(paths) == "absent"
    _commit(paths, 1, "s1")
    assert atomic.recover_pair(paths) == "ok"
    assert [atomic.pair_stamp(p) for p in paths] == ["s1", "s1"]
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors", "m.state.safetensors"]


def test_pair_killed_between_renames_rolls_forward(tmp_path):
    paths = _pair(tmp_path)
    _commit(paths, 1, "s1")
    # what a kill after the first rename leaves: file 1 new, file 2 old + its complete partial
    atomic.save_file({"x": torch.full((4,), 2.0)}, paths[0], {atomic.PAIR_KEY: "s2"})
    atomic.save_file({"x": torch.full((4,), 2.0)}, paths[1] + atomic.PARTIAL, {atomic.PAIR_KEY: "s2"})
    assert atomic.recover_pair(paths) == "ok"
    assert [atomic.pair_stamp(p) for p in paths] == ["s2", "s2"]
    assert not os.path.exists(paths[1] + atomic.PARTIAL)


def test_pair_killed_while_writing_partials_keeps_old_pair(tmp_path):
    paths = _pair(tmp_path)
    _commit(paths, 1, "s1")
    atomic.save_file({"x": torch.full((4,), 2.0)}, paths[0] + atomic.PARTIAL, {atomic.PAIR_KEY: "s2"})
    data = atomic.safetensors_bytes({"x": torch.full((400,), 2.0)}, {atomic.PAIR_KEY: "s2"})
    with open(paths[1] + atomic.PARTIAL, "wb") as f:
        f.write(data[: len(data) // 2])  # truncated: the kill came while writing it
    assert atomic.recover_pair(paths) == "ok"
    assert [atomic.pair_stamp(p) for p in paths] == ["s1", "s1"]
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors", "m.state.safetensors"]


def test_mismatched_pair_is_reported(tmp_path):
    paths = _pair(tmp_path)
    _commit(paths, 1, "s1")
    atomic.save_file({"x": torch.ones(4)}, paths[0], {atomic.PAIR_KEY: "other"})
    assert atomic.recover_pair(paths) == "mismatch"
    os.remove(paths[0])
    assert atomic.recover_pair(paths) == "mismatch"


def test_free_name_numbers_like_save_image(tmp_path):
    def files(n):
        return [str(tmp_path / f"{n}.safetensors"), str(tmp_path / "states" / f"{n}.state.safetensors")]

    assert atomic.free_name("celeb_mlp", files) == "celeb_mlp"
    (tmp_path / "states").mkdir()
    (tmp_path / "states" / "celeb_mlp.state.safetensors").write_bytes(b"x")
    assert atomic.free_name("celeb_mlp", files) == "celeb_mlp_00001"
    assert atomic.free_name("celeb_mlp", files, overwrite=True) == "celeb_mlp"
    (tmp_path / "celeb_mlp_00001.safetensors.partial").write_bytes(b"x")
    assert atomic.free_name("celeb_mlp", files) == "celeb_mlp_00002"
