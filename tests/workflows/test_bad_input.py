"""Bad input through the real headless server, as a careless user and an attacker would send it.

The cases are in ``bad_input_cases.json`` (one line each): broken images, broken or hostile files in every
file widget of the pack, file names that try to leave ComfyUI's folders, and NaN/inf/negative/huge numbers.
For each case: the answer names the node and the input (and says what the case lists), the server runs the
next good prompt, the pickle payload's marker is never written, and nothing is written outside the base
directory's output/, temp/ and user/ folders (checked against a snapshot taken after the fixtures placed
their files).
"""

from __future__ import annotations

import json
import os
import pickle
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from facecond.nodes.ipadapter.adapter import cross_attention_layers
from facecond.py.celebbasis.coeffs import BasisFacts, CelebCoeffs, save_coeffs
from facecond.py.face0.embeds_io import save_embeds
from facecond.py.face0.projection import ProjectionInfo, random_projection, save_projection
from facecond.py.faces.types import FaceEmbeds
from facecond.py.ipadapter.aggregate import SelfAttentionAggregator, save_aggregator
from facecond.py.weights.manifest import sha256_file
from facecond_dev import host
from facecond_dev.bad_input_files import hostile_files
from facecond_dev.random_weights import random_state_dict

CASES = json.loads((Path(__file__).with_name("bad_input_cases.json")).read_text())["cases"]
SCRFD = f"{host.TEST_PACK}/det_2.5g.onnx"
ALLOWED_NEW = ("output", "temp", "user")  # what a run may add to the base directory


class WriteMarker:
    """Unpickling this creates the marker file: the stand-in for a payload that runs code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _variants(good: bytes, marker: Path) -> dict[str, bytes]:
    rng = np.random.default_rng(15)
    return {"truncated": good[: len(good) // 2], "random": rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
            "pickle": pickle.dumps(WriteMarker(marker), protocol=2), "empty": b""}


def _files(base: Path, outside: Path, embedder: str, tiny_model) -> None:
    """Good files (what the graphs need) and the broken ones, in the model folders the nodes list."""
    models = base / "models"
    dirs = {k: models / sub for k, sub in (("face0", "facecond/face0"), ("embeds", "facecond/embeds"),
                                           ("celeb", "facecond/celebbasis"), ("agg", "facecond/aggregators"),
                                           ("ipa", "ipadapter"))}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    tmp = outside / "made"
    tmp.mkdir()
    marker = outside / "MARKER"

    save_embeds(FaceEmbeds(torch.nn.functional.normalize(torch.randn(1, 128), dim=-1), embedder, True, (0,)),
                dirs["embeds"] / "bi_good_embeds.safetensors")
    save_coeffs(CelebCoeffs(torch.randn(2, 4), BasisFacts(4, "t", "n")), dirs["celeb"] / "bi_coeffs_good.safetensors")
    mlp = {"weight": torch.randn(8, 128), "bias": torch.randn(8)}
    mlp_meta = {"facecond.kind": "celeb_mlp", "embedder": embedder, "embed_dim": "128", "p": "4", "table_hash": "t",
                "names_hash": "n", "scale": "[1.0, 1.0]", "names": "[]", "steps": "1"}
    save_file(mlp, str(tmp / "mlp.safetensors"), metadata=mlp_meta)
    save_aggregator(SelfAttentionAggregator(128, 3), tmp / "agg.safetensors")
    layers = cross_attention_layers(tiny_model[0])
    faceid = random_state_dict("faceid", 128, [inner for _, inner, _ in layers], cross_dim=layers[0][2], seed=3)
    torch.save({part: {k[len(part) + 1:]: v for k, v in faceid.items() if k.startswith(part + ".")}
                for part in ("image_proj", "ip_adapter")}, dirs["ipa"] / "bi_faceid.bin")
    save_file(faceid, str(tmp / "ipa.safetensors"))

    good = {"face0": (base / "models/facecond/face0" / host.STAND_IN_PROJECTION).read_bytes(),
            "embeds": (dirs["embeds"] / "bi_good_embeds.safetensors").read_bytes(),
            "coeffs": (dirs["celeb"] / "bi_coeffs_good.safetensors").read_bytes(),
            "mlp": (tmp / "mlp.safetensors").read_bytes(), "agg": (tmp / "agg.safetensors").read_bytes(),
            "ipa": (tmp / "ipa.safetensors").read_bytes()}
    where = {"face0": ("face0", "projection"), "embeds": ("embeds", "embeds"), "coeffs": ("celeb", "coeffs"),
             "mlp": ("celeb", "mlp"), "agg": ("agg", "aggregator"), "ipa": ("ipa", "ipadapter")}
    for kind, (folder, stem) in where.items():
        for variant, data in _variants(good[kind], marker).items():
            (dirs[folder] / f"bi_{stem}_{variant}.safetensors").write_bytes(data)
        other = good["coeffs" if kind == "embeds" else "embeds"]
        (dirs[folder] / f"bi_{stem}_wrong_kind.safetensors").write_bytes(other)
    torch.save(WriteMarker(marker), dirs["ipa"] / "bi_ipadapter_pickle.bin")

    info = ProjectionInfo(embedder=embedder, embed_dim=128, base_model="sd1")
    lie = {k: v.contiguous() for k, v in random_projection(info).state_dict().items()}
    save_file(lie, str(dirs["face0"] / "bi_projection_wrong_width.safetensors"),
              metadata=info.to_metadata() | {"embed_dim": "512"})
    save_projection(random_projection(ProjectionInfo(embedder=embedder, embed_dim=128, context_dim=1024,
                                                     base_model="sd2")),
                    dirs["face0"] / "bi_projection_other_family.safetensors")
    save_file({"embeds": torch.randn(1, 128)}, str(dirs["embeds"] / "bi_embeds_wrong_width.safetensors"),
              metadata={"facecond.kind": "face_embeds", "dim": "512", "model": embedder})
    save_file({"coeffs": torch.zeros(2, 5, dtype=torch.float16)},
              str(dirs["celeb"] / "bi_coeffs_wrong_width.safetensors"),
              metadata={"facecond.kind": "celeb_coeffs", "p": "4", "table_hash": "t", "names_hash": "n"})
    save_file({"weight": torch.randn(8, 64), "bias": torch.randn(8)},
              str(dirs["celeb"] / "bi_mlp_wrong_width.safetensors"), metadata=mlp_meta)
    bad_agg = {k: v.clone() for k, v in SelfAttentionAggregator(128, 3).state_dict().items()}
    bad_agg["k.weight"] = torch.zeros(128, 64)
    save_file(bad_agg, str(dirs["agg"] / "bi_aggregator_wrong_width.safetensors"))
    narrow = dict(faceid)
    narrow["image_proj.proj.0.weight"] = narrow["image_proj.proj.0.weight"][:, :64].contiguous()
    save_file(narrow, str(dirs["ipa"] / "bi_ipadapter_wrong_width.safetensors"))
    hostile_files(dirs, mlp, mlp_meta, faceid, embedder)


def _images(base: Path, face: Path) -> None:
    inp = base / "input"
    photo = Image.open(face).convert("RGB")
    photo.save(inp / "bi_face.png")
    rgba = photo.convert("RGBA")
    rgba.putalpha(200)
    rgba.save(inp / "bi_rgba.png")
    photo.convert("L").save(inp / "bi_grey.png")
    grey16 = (np.asarray(photo.convert("L"), np.uint16) * 257).astype(np.uint16)
    Image.fromarray(grey16).save(inp / "bi_16bit.png")
    Image.new("RGB", (1, 1), (200, 150, 120)).save(inp / "bi_1x1.png")
    Image.new("RGB", (6000, 6000), (90, 120, 150)).save(inp / "bi_6000.png")
    Image.fromarray(np.full((160, 160, 3), 128, np.uint8)).save(inp / "bi_noface.png")
    photo.save(inp / "bi_full.jpg", "JPEG", quality=90)
    data = (inp / "bi_full.jpg").read_bytes()
    (inp / "bi_truncated.jpg").write_bytes(data[: int(len(data) * 0.6)])
    (inp / "bi_full.jpg").unlink()
    (inp / "bi_text.png").write_text("not an image, only text with a .png name\n")


def _snapshot(base: Path) -> set[str]:
    out = set()
    for root, dirs, files in os.walk(base, followlinks=False):
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(root, d))]  # the pack link, model links
        out.update(os.path.relpath(os.path.join(root, f), base) for f in files)
    return out


@pytest.fixture(scope="module")
def bad_server(server, shared_data, tiny_model, tmp_path_factory):
    base = Path(server.base_dir)
    outside = tmp_path_factory.mktemp("outside-base")
    host.install_stand_in_models(base)
    recogniser = base / "models/insightface/models" / host.STAND_IN_RECOGNISER
    embedder = f"insightface/{recogniser.name}@{sha256_file(recogniser)[:8]}"  # FaceEmbed's id for it
    _files(base, outside, embedder, tiny_model)
    _images(base, shared_data / "faces" / "obama" / "obama.jpg")
    (base / "output").mkdir(exist_ok=True)
    (base / "output" / "bi_a_file.txt").write_text("a file where a dataset_name asks for a folder\n")
    server.object_info(refresh=True)
    before = _snapshot(base)
    yield server, outside
    trained = {c["args"]["save_name"] for c in CASES if c["expect"] == "ok" and c["graph"].startswith("train_")}
    new = sorted(p for p in _snapshot(base) - before if p.split(os.sep)[0] not in ALLOWED_NEW
                 and not (p.startswith("models" + os.sep) and Path(p).name.split(".")[0] in trained))
    assert not new, f"files written outside output/, temp/ and user/: {new}"
    assert not (outside / "MARKER").exists(), "a pickle payload ran"
    assert sorted(p.name for p in outside.iterdir()) == ["made"], list(outside.iterdir())


# --- graphs: each builder returns an API-format prompt -------------------------------------------------------------
def _ckpt():
    return {"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": host.EXAMPLE_CKPT}}}


def _face_embeds(image="bi_face.png"):
    return {"img": {"class_type": "LoadImage", "inputs": {"image": image}},
            "det": {"class_type": "FacecondFaceDetectCrop", "inputs": {
                "image": ["img", 0], "detector": SCRFD, "select": "largest", "face_index": 0, "min_size": 40,
                "margin_scale": 1.0, "upright": "off", "no_face": "error"}},
            "emb": {"class_type": "FacecondFaceEmbed", "inputs": {
                "faces": ["det", 0], "model": host.STAND_IN_RECOGNISER, "facenet_layer": "bottleneck_512",
                "normalize": "auto"}}}


def _good_embeds():
    return {"fe": {"class_type": "FacecondLoadFaceEmbeds", "inputs": {"embeds_name": "bi_good_embeds.safetensors"}}}


def _preview(src):
    return {"out": {"class_type": "PreviewAny", "inputs": {"source": src}}}


def g_detect(a):
    g = _face_embeds(a.get("image", "bi_face.png"))
    del g["emb"]
    g["det"]["inputs"].update({k: a[k] for k in ("margin_scale", "min_size", "no_face") if k in a})
    return g | _preview(["det", 4])


def g_load(a):
    return {"ld": {"class_type": a["node"], "inputs": {a["input"]: a["name"]}}} | _preview(["ld", 0])


def g_project(a):
    return _ckpt() | _good_embeds() | {
        "txt": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo", "clip": ["ckpt", 1]}},
        "proj": {"class_type": "FacecondLoadFace0Projection", "inputs": {"projection_name": a["name"]}},
        "p2c": {"class_type": "FacecondProjectToContext", "inputs": {
            "conditioning": ["txt", 0], "face_embeds": ["fe", 0], "projection": ["proj", 0], "clip": ["ckpt", 1],
            "chunks": "each"}}} | _preview(["p2c", 0])


def g_mlp(a):
    return _ckpt() | {"cb": {"class_type": "FacecondCelebBasisCoeffs", "inputs": {
        "clip": ["ckpt", 1], "pseudo_word": "<bi>", "mlp_name": a["name"]}}} | _preview(["cb", 1])


def _adapter_embeds():
    return _face_embeds() | {
        "ipa": {"class_type": "FacecondLoadIPAdapter", "inputs": {"ipadapter_name": "bi_faceid.bin"}},
        "enc": {"class_type": "FacecondIPAdapterEncode", "inputs": {
            "ipadapter": ["ipa", 0], "crop": "center", "face_embeds": ["emb", 0]}}}


def g_aggregate(a):
    return _adapter_embeds() | {"agg": {"class_type": "FacecondAggregateEmbeds", "inputs": {
        "embeds": ["enc", 0], "method": "self-attention", "aggregator_name": a["name"], "seed": 0}}} \
        | _preview(["agg", 1])


def g_apply_ipadapter(a):
    return _ckpt() | _adapter_embeds() | {"app": {"class_type": "FacecondApplyIPAdapter", "inputs": {
        "model": ["ckpt", 0], "ipadapter": ["ipa", 0], "embeds": ["enc", 0], "weight": a.get("weight", 1.0),
        "start_at": 0.0, "end_at": 1.0, "lora_strength": a.get("lora_strength", 1.0)}}} | _preview(["app", 0])


def g_train_celeb(a):
    return _ckpt() | _good_embeds() | {
        "img": {"class_type": "LoadImage", "inputs": {"image": "bi_face.png"}},
        "t": {"class_type": "FacecondTrainCelebBasis", "inputs": {
            "model": ["ckpt", 0], "clip": ["ckpt", 1], "vae": ["ckpt", 2], "images": ["img", 0],
            "face_embeds": ["fe", 0], "identities": "", "prompt_templates": "a photo of {}",
            "steps": a.get("steps", 1), "learning_rate": a.get("learning_rate", 0.005), "p": 8, "seed": 0,
            "augment": False, "save_name": a.get("save_name", "bi_mlp"), "resume": a.get("resume", False)}}} \
        | _preview(["t", 2])


def g_train_ti(a):
    return _ckpt() | {
        "img": {"class_type": "LoadImage", "inputs": {"image": "bi_face.png"}},
        "t": {"class_type": "FacecondTrainFaceTI", "inputs": {
            "model": ["ckpt", 0], "clip": ["ckpt", 1], "vae": ["ckpt", 2], "images": ["img", 0], "init": "face",
            "num_vectors": 2, "reparam": "none", "prompt_templates": "a photo of {}", "steps": 1,
            "learning_rate": 0.005, "seed": 0, "augment": False, "save_name": a["save_name"],
            "resume": a.get("resume", False)}}} | _preview(["t", 2])


def g_save_embeds(a):
    return _good_embeds() | {"save": {"class_type": "FacecondSaveFaceEmbeds", "inputs": {
        "face_embeds": ["fe", 0], "filename_prefix": a["filename_prefix"],
        "destination": a.get("destination", "embeds_folder"), "source": ""}}}


def g_save_coeffs(a):
    return {"lc": {"class_type": "FacecondLoadCelebCoeffs", "inputs": {"coeffs_name": "bi_coeffs_good.safetensors"}},
            "save": {"class_type": "FacecondSaveCelebCoeffs", "inputs": {
                "coefficients": ["lc", 0], "filename_prefix": a["filename_prefix"]}}}


def g_interpolate(a):
    return _good_embeds() | {"ei": {"class_type": "FacecondEmbeddingInterpolate", "inputs": {
        "face_embeds": ["fe", 0], "face_embeds_b": ["fe", 0], "mode": "lerp", "t_start": a.get("t_start", 0.0),
        "t_end": a.get("t_end", 1.0), "count": 2, "weights": "", "strength": a.get("strength", 1.0),
        "noise_sigma": 0.0, "seed": 0}}} | _preview(["ei", 0])


def g_sampler(a):
    return _ckpt() | {
        "txt": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo", "clip": ["ckpt", 1]}},
        "lat": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "s": {"class_type": "FacecondThreeWayCFGSampler", "inputs": {
            "model": ["ckpt", 0], "seed": 0, "steps": 1, "cfg": a.get("cfg", 7.5), "c": a.get("c", 1.0), "a": 0.0,
            "sampler_name": "euler", "scheduler": "simple", "positive": ["txt", 0], "text_only": ["txt", 0],
            "face_only": ["txt", 0], "negative": ["txt", 0], "latent_image": ["lat", 0], "denoise": 1.0}}} \
        | _preview(["s", 0])


def g_tag_faces(a):
    g = _face_embeds()
    del g["emb"]
    return g | {
        "prep": {"class_type": "FacecondFaceChainPreprocess", "inputs": {
            "image": ["img", 0], "faces": ["det", 0], "resolution": 64, "context": 2.0, "head_mask": "none",
            "background": "keep"}},
        "tag": {"class_type": "FacecondFaceChainTagFaces", "inputs": {
            "images": ["prep", 0], "image": ["img", 0], "faces": ["det", 0],
            "genderage_model": "buffalo_l/genderage.onnx", "trigger_word": "a handsome man", "token": "sks",
            "dataset_name": a["dataset_name"], "epochs": 1, "batch_size": 1}}} | _preview(["tag", 3])


GRAPHS = {name[2:]: fn for name, fn in globals().items() if name.startswith("g_")}


def _args(case: dict, outside: Path) -> dict:
    def fill(v):
        return v.replace("{OUTSIDE}", str(outside)).replace("{LONG}", "n" * 300) if isinstance(v, str) else v

    return {k: fill(v) for k, v in case["args"].items()}


def _submit(server, prompt: dict) -> tuple[str, dict]:
    """("validation", node_errors) if POST /prompt refuses the graph, else ("run", result)."""
    body = json.dumps({"prompt": prompt, "client_id": server.client_id}).encode()  # NaN/Infinity as literals
    req = urllib.request.Request(server.url + "/prompt", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=server.request_timeout) as r:
            answer = json.loads(r.read())
    except urllib.error.HTTPError as e:
        return "validation", json.loads(e.read() or b"{}")
    if answer.get("node_errors"):  # part of the graph refused: treat as refused
        return "validation", answer
    return "run", server.wait(answer["prompt_id"], timeout=300)


def _check(case: dict, outcome: str, answer) -> None:
    old_host = host.comfy_version()[:2] <= (0, 3)
    exp = case["expect_comfyui_0.3"] if old_host and "expect_comfyui_0.3" in case else case["expect"]
    if exp == "ok":
        assert outcome == "run" and answer.status == "success", (case["id"], outcome, getattr(answer, "error", answer))
        return
    assert outcome == exp["at"], (case["id"], outcome, getattr(answer, "error", answer))
    if outcome == "validation":
        errors = answer.get("node_errors", {})
        hits = [(nid, e) for nid, e in errors.items() if e["class_type"] == exp["node"]]
        assert hits, (case["id"], answer)
        text = json.dumps([e["errors"] for _, e in hits])
        assert any(err.get("extra_info", {}).get("input_name") == exp["input"] for _, e in hits
                   for err in e["errors"]), (case["id"], text)
    else:
        err = answer.error
        assert answer.status == "error" and err is not None, (case["id"], answer.status)
        assert err["node_type"] == exp["node"], (case["id"], err["node_type"], err["exception_message"])
        text = err["exception_message"]
        if exp["node"].startswith("Facecond"):  # our messages name the node and the input themselves
            display = exp["node"][len("Facecond"):]
            assert display in text and exp["input"] in text, (case["id"], text)
        assert "header too large" not in text and "Traceback" not in text, (case["id"], text)
    for needle in exp["says"]:
        assert needle in text, (case["id"], needle, text)
    assert len(text) <= exp.get("max_chars", len(text)), (case["id"], len(text), text[:300])


def test_bad_input_cases(bad_server):
    server, outside = bad_server
    failures = []
    for case in CASES:
        prompt = GRAPHS[case["graph"]](_args(case, outside))
        outcome, answer = _submit(server, prompt)
        try:
            _check(case, outcome, answer)
        except AssertionError as e:
            failures.append(str(e)[:1500])
        alive = _good_embeds() | {"save": {"class_type": "FacecondSaveFaceEmbeds", "inputs": {
            "face_embeds": ["fe", 0], "filename_prefix": f"alive/{case['id']}", "destination": "output",
            "source": case["id"]}}}
        after = server.run(alive, timeout=120)
        assert after.status == "success", (case["id"], "the next good prompt failed", after.error)
        assert not (outside / "MARKER").exists(), (case["id"], "a pickle payload ran")
    assert not failures, "\n".join(failures)
    written = sorted(p.name for p in (Path(server.base_dir) / "output" / "alive").iterdir())
    assert len(written) >= len(CASES)
