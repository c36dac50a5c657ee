"""Hostile pack files (issue 22): metadata that asks for huge allocations, zero or non-numeric numbers, megabyte
strings, NaN/inf and integer weights. Each is refused with a ``PackFileError`` before anything large is allocated,
quoting at most ``MAX_QUOTE`` characters of the file's text."""

from __future__ import annotations

import resource
import time

import pytest
import torch
from safetensors.torch import save_file

from facecond.py.celebbasis import basis as cb
from facecond.py.celebbasis.coeffs import load_coeffs, load_mlp
from facecond.py.face0.embeds_io import load_embeds
from facecond.py.face0.projection import ProjectionInfo, load_projection, random_projection
from facecond.py.ipadapter.adapter import from_state_dict, read_file
from facecond.py.ipadapter.aggregate import SelfAttentionAggregator, load_aggregator
from facecond.py.weights import packfile
from facecond_dev.random_weights import random_state_dict

INFO = ProjectionInfo(embedder="e", embed_dim=16, tokens=3, context_dim=8, hidden=8)
MLP_META = {"facecond.kind": "celeb_mlp", "embedder": "e", "embed_dim": "16", "p": "4", "table_hash": "t",
            "names_hash": "n", "scale": "[1.0, 1.0]", "names": '["Tom Hanks", "Emma Stone"]', "steps": "1"}


def _projection(path, meta=None, state=None):
    state = state or {k: v.contiguous() for k, v in random_projection(INFO).state_dict().items()}
    save_file(state, str(path), metadata=INFO.to_metadata() | (meta or {}))
    return path


def _refused(load, path, problem, *says):
    """Refused with ``problem``, in < 1 s and < 100 MB of new peak RSS; the message short and saying ``says``."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    t = time.perf_counter()
    with pytest.raises(packfile.PackFileError) as info:
        load(path)
    took, grew = time.perf_counter() - t, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) / 1024
    assert took < 1.0 and grew < 100, (took, grew, str(info.value)[:300])
    e = info.value
    assert e.problem == problem, str(e)[:500]
    assert len(str(e)) < 1500, len(str(e))
    for s in says:
        assert s in str(e), (s, str(e))
    return e


def test_projection_metadata_cannot_make_the_loader_allocate(tmp_path):
    # today: hidden=16384 built a 2.2 GB module (8.9 s) before comparing shapes
    _refused(load_projection, _projection(tmp_path / "h.safetensors", {"hidden": "16384"}), "bad_metadata",
             "'hidden' must be a whole number from 1 to 8192", "16384")
    _refused(load_projection, _projection(tmp_path / "h2.safetensors", {"hidden": "8192", "depth": "16"}),
             "wrong_shape", "do not match its metadata", "hidden=8192")
    for key, value in (("tokens", "0"), ("tokens", "78"), ("embed_dim", "[512]"), ("depth", "four"),
                       ("context_dim", "1e9"), ("hidden", "-768"), ("embed_dim", "9" * 5000)):
        e = _refused(load_projection, _projection(tmp_path / f"{key}.safetensors", {key: value}), "bad_metadata",
                     repr(key))
        assert len(str(e)) < 900


def test_megabyte_metadata_is_quoted_clipped_and_oversized_headers_refused(tmp_path):
    e = _refused(load_projection, _projection(tmp_path / "m.safetensors", {"embed_dim": "x" * 1_000_000}),
                 "bad_metadata", "characters in all")
    assert len(str(e)) < 800
    _refused(load_projection, _projection(tmp_path / "e.safetensors", {"embedder": "y" * 1_000_000}),
             "bad_metadata", "'embedder' must be a text of at most 200 characters")
    _refused(load_projection, _projection(tmp_path / "big.safetensors", {"extra": '"' + "z" * 10_000_000 + '"'}),
             "too_large", "safetensors header")


def test_non_finite_and_integer_weights_are_refused_naming_the_tensor(tmp_path):
    state = {k: v.contiguous() for k, v in random_projection(INFO).state_dict().items()}
    for bad, name in ((float("nan"), "nan"), (float("inf"), "inf")):
        s = dict(state)
        s["mlp.4.weight"] = s["mlp.4.weight"].clone()
        s["mlp.4.weight"][0, 0] = bad
        _refused(load_projection, _projection(tmp_path / f"{name}.safetensors", state=s), "non_finite",
                 "'mlp.4.weight'", "1 NaN/inf")
    s = dict(state)
    s["mlp.0.weight"] = s["mlp.0.weight"].to(torch.int8)
    _refused(load_projection, _projection(tmp_path / "i8.safetensors", state=s), "wrong_dtype", "'mlp.0.weight'",
             "I8", "F16 or BF16 or F32")
    s = {k: v.to(torch.bfloat16) for k, v in state.items()}  # bf16 / fp16 are accepted, loaded as float32
    assert next(load_projection(_projection(tmp_path / "bf16.safetensors", state=s)).parameters()).dtype == \
        torch.float32


def _aggregator(path, n_refs=3, heads=1, nan=False):
    sd = {k: v.clone() for k, v in SelfAttentionAggregator(16, 3).state_dict().items()}
    sd["n_refs"], sd["heads"] = torch.tensor(n_refs), torch.tensor(heads)
    if nan:
        sd["q.weight"][0, 0] = float("nan")
    save_file(sd, str(path), metadata={"attention": "residual"})
    return path


def test_aggregator_numbers_bounded(tmp_path):
    _refused(load_aggregator, _aggregator(tmp_path / "n.safetensors", n_refs=2**40), "wrong_shape",
             "n_refs=1099511627776", "n_refs 1..1024")
    _refused(load_aggregator, _aggregator(tmp_path / "h0.safetensors", heads=0), "wrong_shape", "heads=0")
    _refused(load_aggregator, _aggregator(tmp_path / "h3.safetensors", heads=3), "wrong_shape", "dividing D=16")
    _refused(load_aggregator, _aggregator(tmp_path / "nan.safetensors", nan=True), "non_finite", "'q.weight'")
    sd = {k: v.clone() for k, v in SelfAttentionAggregator(16, 3).state_dict().items()}
    sd["n_refs"] = torch.tensor(3.0)
    save_file(sd, str(tmp_path / "f.safetensors"))
    _refused(load_aggregator, tmp_path / "f.safetensors", "wrong_dtype", "'n_refs'", "I64 or I32")
    sd = {k: v.clone() for k, v in SelfAttentionAggregator(16, 3).state_dict().items()}
    torch.save(sd | {"heads": torch.tensor(0)}, tmp_path / "h0.bin")
    _refused(load_aggregator, tmp_path / "h0.bin", "wrong_shape", "heads=0")
    assert int(load_aggregator(_aggregator(tmp_path / "ok.safetensors")).n_refs) == 3


def test_ipadapter_shapes_checked_on_the_meta_device(tmp_path):
    sd = random_state_dict("faceid", 16, [32, 32], cross_dim=8, seed=0)
    huge = dict(sd)
    huge["image_proj.proj.0.weight"] = torch.zeros(2, 8000)  # would build Linear(8000, 16000) (0.5 GB) and more
    save_file(huge, str(tmp_path / "huge.safetensors"))
    _refused(read_file, tmp_path / "huge.safetensors", "wrong_shape", "does not have the shapes", "proj.0.weight")
    huge["image_proj.proj.0.weight"] = torch.zeros(2, 100_000)  # Linear(100000, 200000): 80 GB
    with pytest.raises(ValueError, match=r"100000-d input.*outside the sizes the pack loads"):
        from_state_dict(huge, "huge")
    zero = dict(sd)
    zero["image_proj.norm.weight"], zero["image_proj.norm.bias"] = torch.zeros(0), torch.zeros(0)
    with pytest.raises(ValueError, match="unsupported IP-Adapter image projection"):
        from_state_dict(zero, "zero")
    nan = {k: v.clone() for k, v in sd.items()}
    nan["ip_adapter.1.to_k_ip.weight"][0, 0] = float("inf")
    save_file(nan, str(tmp_path / "nan.safetensors"))
    _refused(read_file, tmp_path / "nan.safetensors", "non_finite", "'ip_adapter.1.to_k_ip.weight'")
    torch.save({k: v.to(torch.int8) if k.endswith("to_v_ip.weight") else v for k, v in sd.items()},
               tmp_path / "i8.bin")
    _refused(read_file, tmp_path / "i8.bin", "wrong_dtype", "to_v_ip.weight", "I8")
    torch.save({k: v.half() for k, v in sd.items()}, tmp_path / "fp16.bin")
    assert from_state_dict(read_file(tmp_path / "fp16.bin"), "fp16").kv[0][0].dtype == torch.float32


def test_embeds_coeffs_and_mlp_refuse_nan_and_hostile_metadata(tmp_path):
    meta = {"facecond.kind": "face_embeds", "model": "e", "dim": "4"}
    save_file({"embeds": torch.tensor([[0.0, float("nan"), 1.0, 2.0]])}, str(tmp_path / "e.safetensors"), metadata=meta)
    _refused(load_embeds, tmp_path / "e.safetensors", "non_finite", "'embeds'")
    save_file({"embeds": torch.ones(1, 4, dtype=torch.int8)}, str(tmp_path / "i.safetensors"), metadata=meta)
    _refused(load_embeds, tmp_path / "i.safetensors", "wrong_dtype", "'embeds'")
    save_file({"embeds": torch.ones(1, 4)}, str(tmp_path / "s.safetensors"),
              metadata=meta | {"source_index": "[" * 100_000})  # a JSON bomb in a free-text field is ignored
    assert load_embeds(tmp_path / "s.safetensors")[0].source_index == (-1,)

    cmeta = {"facecond.kind": "celeb_coeffs", "p": "4", "table_hash": "t", "names_hash": "n"}
    save_file({"coeffs": torch.full((2, 4), float("inf"), dtype=torch.float16)}, str(tmp_path / "c.safetensors"),
              metadata=cmeta)
    _refused(load_coeffs, tmp_path / "c.safetensors", "non_finite", "'coeffs'")
    save_file({"coeffs": torch.zeros(2, 4)}, str(tmp_path / "c0.safetensors"), metadata=cmeta | {"p": "0"})
    _refused(load_coeffs, tmp_path / "c0.safetensors", "bad_metadata", "'p' must be a whole number from 1 to 8192")

    good = {"weight": torch.randn(8, 16), "bias": torch.randn(8)}
    for key, value, says in (("names", "5", "'names' must be a JSON list"),  # was: 'int' object is not iterable
                             ("names", '["only one"]', "'names' must be a JSON list of 2"),
                             ("scale", '["a", "b"]', "'scale' must be a JSON list of 2 positive"),  # new(): str
                             ("scale", "[NaN, 1]", "'scale'"), ("p", "[4]", "'p' must be a whole number")):
        save_file(good, str(tmp_path / "m.safetensors"), metadata=MLP_META | {key: value})
        _refused(load_mlp, tmp_path / "m.safetensors", "bad_metadata", says)
    bad = dict(good)
    bad["bias"] = torch.full((8,), float("nan"))
    save_file(bad, str(tmp_path / "mn.safetensors"), metadata=MLP_META)
    _refused(load_mlp, tmp_path / "mn.safetensors", "non_finite", "'bias'")
    save_file(good, str(tmp_path / "ok.safetensors"), metadata=MLP_META)
    assert load_mlp(tmp_path / "ok.safetensors")[1]["names"] == ["Tom Hanks", "Emma Stone"]


def test_name_lists_and_templates_are_bounded(tmp_path):
    with pytest.raises(ValueError, match="only 1 name"):
        cb.parse_names("Tom Hanks\n", "names_text")
    with pytest.raises(ValueError, match="more than 10,000 names"):
        cb.parse_names("\n".join(f"name {i}" for i in range(10_001)), "names_text")
    with pytest.raises(ValueError, match="line 2 is 101 characters"):
        cb.parse_names("Tom Hanks\n" + "x" * 101, "names_text")
    (tmp_path / "big.txt").write_text("a b\n" * 300_000)
    t = time.perf_counter()
    with pytest.raises(ValueError, match="1,200,000 bytes; at most 1,048,576"):
        cb.load_names(tmp_path / "big.txt")
    assert time.perf_counter() - t < 0.5
    assert len(cb.load_names()) >= 2
    with pytest.raises(ValueError, match="TrainFaceTI: prompt_templates has 257 templates"):
        cb.split_templates("a photo of {}\n" * 257, "TrainFaceTI")
    with pytest.raises(ValueError, match="template 1 is 1,001 characters"):
        cb.split_templates("{}" + "x" * 999, "TrainCelebBasis")
    with pytest.raises(ValueError, match="is 10,000,000 characters long"):
        cb.split_templates("x" * 10_000_000, "TrainCelebBasis")
    assert cb.split_templates(" a photo of {} \n\n", "X") == ["a photo of {}"]
