"""Hostile pack files for the bad-input suite (tests/workflows/test_bad_input.py, issue 22).

Metadata asking for huge allocations or holding non-numbers, megabyte strings, NaN/inf/int8 weights, and trainer
runs that cannot be resumed (no state, a state from another run, a state that is not one).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from facecond.py.face0.projection import ProjectionInfo, random_projection
from facecond.py.ipadapter.aggregate import SelfAttentionAggregator
from facecond.py.weights.atomic import PAIR_KEY, make_stamp


def hostile_files(dirs: dict, mlp: dict, mlp_meta: dict, faceid: dict, embedder: str) -> None:
    """Issue 22: metadata asking for huge allocations or holding non-numbers, megabyte strings, NaN/int8 weights."""
    info = ProjectionInfo(embedder=embedder, embed_dim=128, base_model="sd1")
    state = {k: v.contiguous() for k, v in random_projection(info).state_dict().items()}
    for name, meta in (("hidden16384", {"hidden": "16384"}), ("megabyte_meta", {"embed_dim": "x" * 1_000_000})):
        save_file(state, str(dirs["face0"] / f"bi_projection_{name}.safetensors"), metadata=info.to_metadata() | meta)
    nan = dict(state, **{"mlp.6.bias": torch.full_like(state["mlp.6.bias"], float("nan"))})
    save_file(nan, str(dirs["face0"] / "bi_projection_nan.safetensors"), metadata=info.to_metadata())
    i8 = dict(state, **{"mlp.0.weight": state["mlp.0.weight"].to(torch.int8)})
    save_file(i8, str(dirs["face0"] / "bi_projection_int8.safetensors"), metadata=info.to_metadata())
    agg = SelfAttentionAggregator(128, 3).state_dict()
    for name, change in (("n_refs_huge", {"n_refs": torch.tensor(2**40)}), ("heads_zero", {"heads": torch.tensor(0)}),
                         ("nan", {"q.weight": torch.full((128, 128), float("nan"))})):
        save_file({k: v.clone() for k, v in agg.items()} | change,
                  str(dirs["agg"] / f"bi_aggregator_{name}.safetensors"))
    ipa = dict(faceid, **{"ip_adapter.1.to_k_ip.weight": torch.full_like(faceid["ip_adapter.1.to_k_ip.weight"],
                                                                          float("inf"))})
    save_file(ipa, str(dirs["ipa"] / "bi_ipadapter_inf.safetensors"))
    torch.save({k: v.to(torch.int8) for k, v in faceid.items()}, dirs["ipa"] / "bi_ipadapter_int8.bin")
    save_file({"embeds": torch.full((1, 128), float("nan"))}, str(dirs["embeds"] / "bi_embeds_nan.safetensors"),
              metadata={"facecond.kind": "face_embeds", "dim": "128", "model": embedder})
    save_file({"coeffs": torch.full((2, 4), float("inf"), dtype=torch.float16)},
              str(dirs["celeb"] / "bi_coeffs_inf.safetensors"),
              metadata={"facecond.kind": "celeb_coeffs", "p": "4", "table_hash": "t", "names_hash": "n"})
    for name, meta in (("names_int", {"names": "5"}), ("scale_text", {"scale": '["a", "b"]'}),
                       ("one_name", {"names": '["Tom Hanks"]'})):
        save_file(mlp, str(dirs["celeb"] / f"bi_mlp_{name}.safetensors"), metadata=mlp_meta | meta)
    resume_files(dirs["celeb"], mlp, mlp_meta)


def resume_files(celeb: Path, mlp: dict, mlp_meta: dict) -> None:
    """bi_resume_mismatch: an MLP and a state stamped by two different runs (a file replaced by hand);
    bi_resume_notstate: one stamped pair whose state file is not a trainer state; bi_resume_nostate: an MLP alone."""
    state = {"optim.0.exp_avg": torch.zeros(8, 128)}
    for name, stamps in (("mismatch", ("run-a", "run-b")), ("notstate", ("run-c", "run-c"))):
        save_file(mlp, str(celeb / f"bi_resume_{name}.safetensors"),
                  metadata=mlp_meta | {PAIR_KEY: make_stamp(stamps[0], 4)})
        meta = {PAIR_KEY: make_stamp(stamps[1], 4)}
        save_file(state, str(celeb / f"bi_resume_{name}.state.safetensors"), metadata=meta)
    save_file(mlp, str(celeb / "bi_resume_nostate.safetensors"), metadata=mlp_meta | {PAIR_KEY: make_stamp("run-d", 4)})
