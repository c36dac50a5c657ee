"""The pack's one model cache (nodes/model_cache.py) against real ComfyUI model management, in-process: one load per
file, a new load for a changed file, nothing left after ComfyUI's unload_all_models, ONNX sessions closed with
their entries, and models that work again after being freed."""

from __future__ import annotations

import gc
import os
import weakref

import comfy.model_management as mm
import folder_paths
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from facecond.nodes import model_cache
from facecond.py.face0.projection import ProjectionInfo, load_projection, random_projection, save_projection
from facecond.py.faces import dlib_rec
from facecond.py.faces.onnx_pack import SessionModule
from facecond_dev.face_photos import detect_faces, embed_faces

REC = "testpack/mobilefacenet_128.onnx"
DET = "testpack/det_2.5g.onnx"
# Where dlib is installed (the eval extra; CI installs it), FaceDetectCrop also loads dlib's shape predictor (for its
# 150-px chips) and FaceEmbed(dlib_resnet_v1) its ResNet: cached and freed like every other model.
DLIB = dlib_rec.available()
SHAPE = ["dlib-shape"] if DLIB else []

pytestmark = pytest.mark.usefixtures("one_torch_thread", "stand_in_models")


@pytest.fixture(autouse=True)
def empty_cache():
    model_cache.clear()
    yield
    model_cache.clear()


def _photo(shared_data) -> torch.Tensor:
    im = Image.open(shared_data / "faces/astronaut/astronaut.png").convert("RGB")
    return torch.from_numpy(np.asarray(im, np.float32) / 255.0)[None]


def _detect(image, detector):
    return detect_faces(image, no_face="error", detector=detector, upright="off")


def _ours_in_comfy() -> int:
    """How many of ComfyUI's loaded models are modules of this pack (MTCNN nets, FaceNet, sessions, dlib, ...)."""
    return sum(1 for lm in mm.current_loaded_models
               if lm.model is not None and hasattr(lm.model.model, "_facecond_cache_key"))


def _kinds() -> list[str]:
    return [e.kind for e in model_cache.entries()]


def _projection_file(path, seed):
    info = ProjectionInfo(embed_dim=8, context_dim=16, tokens=3, hidden=12, embedder="test/embedder")
    save_projection(random_projection(info, seed=seed), path)


def test_same_file_loads_once_and_a_changed_file_loads_anew(tmp_path):
    path = tmp_path / "proj.safetensors"
    _projection_file(path, seed=1)
    builds = []

    def build(p):
        builds.append(p)
        return load_projection(p)

    a = model_cache.load("face0-projection", path, build, lambda m: m)
    b = model_cache.load("face0-projection", path, build, lambda m: m)
    link = tmp_path / "link.safetensors"
    os.symlink(path, link)
    c = model_cache.load("face0-projection", link, build, lambda m: m)  # another name for the same file
    assert a is b is c and len(builds) == 1

    _projection_file(path, seed=2)  # rewritten: new weights, new mtime
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    d = model_cache.load("face0-projection", path, build, lambda m: m)
    assert d is not a and len(builds) == 2
    assert not torch.equal(d.mlp[0].weight, a.mlp[0].weight)
    assert torch.equal(d.mlp[0].weight, load_projection(path).mlp[0].weight)
    assert [e.model for e in model_cache.entries()] == [d]  # the stale model is gone


def test_comfy_unload_frees_every_model_and_reloaded_models_work(shared_data, comfy_base):
    from facenet_pytorch.models.inception_resnet_v1 import InceptionResnetV1

    facenet = comfy_base / "models/facenet/facenet_cache_test.pt"
    facenet.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(InceptionResnetV1(pretrained=None, classify=False).state_dict(), facenet)
    img = _photo(shared_data)

    faces = _detect(img, "mtcnn")
    _detect(img, DET)
    assert sorted(_kinds()) == [*SHAPE, "mtcnn", "onnx-detector"]  # dlib: shape predictor only
    rec1 = embed_faces(faces, REC).embeds
    fn1 = embed_faces(faces, "facenet/facenet_cache_test.pt").embeds
    dl1 = embed_faces(faces, dlib_rec.MODEL_NAME).embeds if DLIB else None
    expected = sorted(["facenet", "mtcnn", "onnx-detector", "onnx-recogniser", *SHAPE, *(["dlib-resnet"] * DLIB)])
    assert sorted(_kinds()) == expected
    assert _ours_in_comfy() == len(expected)
    rows = model_cache.describe()
    assert all(r["loaded_in_comfy"] and r["bytes"] > 0 for r in rows)
    devices = {r["kind"]: r["device"] for r in rows}
    assert devices["onnx-recogniser"] == "cpu"  # open, CPU provider (no GPU here)
    assert all(devices[k] == "cpu" for k in expected if k.startswith("dlib"))  # loaded (dlib-bin: CPU only)

    # the same models serve the next run (no new entries, same objects)
    objs = [e.model for e in model_cache.entries()]
    _detect(img, "mtcnn")
    embed_faces(faces, REC)
    if DLIB:
        embed_faces(faces, dlib_rec.MODEL_NAME)
    assert len(_kinds()) == len(expected) and all(any(o is e.model for e in model_cache.entries()) for o in objs)
    del objs

    sessions = [e.module for e in model_cache.entries() if isinstance(e.module, SessionModule)]
    dlibs = [e.module for e in model_cache.entries() if isinstance(e.module, dlib_rec.DlibModel)]
    mtcnn = weakref.ref(next(e.module for e in model_cache.entries() if e.kind == "mtcnn"))
    facenet_net = weakref.ref(next(e.module for e in model_cache.entries() if e.kind == "facenet"))
    dlib_refs = [weakref.ref(d) for d in dlibs]
    assert len(sessions) == 2 and all(s.session is not None for s in sessions)
    assert len(dlibs) == 2 * DLIB and all(d.loaded for d in dlibs)

    mm.unload_all_models()  # what ComfyUI's "free model memory" / POST /free {"unload_models": true} runs
    mm.soft_empty_cache()
    gc.collect()
    assert _kinds() == [] and model_cache.describe() == [] and _ours_in_comfy() == 0
    assert all(s.session is None for s in sessions)  # the onnxruntime sessions are closed
    assert not any(d.loaded for d in dlibs)  # dlib's shape predictor and ResNet are dropped
    del sessions, dlibs
    gc.collect()
    assert mtcnn() is None and facenet_net() is None  # nothing of ours keeps MTCNN or FaceNet alive
    assert all(r() is None for r in dlib_refs)  # nor dlib's models

    faces2 = _detect(img, "mtcnn")  # loaded anew, and the same numbers as before
    assert torch.equal(faces2.crops_facenet, faces.crops_facenet)
    assert torch.allclose(embed_faces(faces2, REC).embeds, rec1, atol=1e-6)
    assert torch.allclose(embed_faces(faces2, "facenet/facenet_cache_test.pt").embeds, fn1, atol=1e-5)
    if DLIB:
        assert torch.equal(faces2.crops_dlib, faces.crops_dlib)
        assert torch.allclose(embed_faces(faces2, dlib_rec.MODEL_NAME).embeds, dl1, atol=1e-6)
    assert _ours_in_comfy() == 3 + 2 * DLIB


def test_onnx_sessions_are_bounded(shared_data, monkeypatch):
    monkeypatch.setattr(model_cache, "MAX_SESSIONS", 1)
    img = _photo(shared_data)
    faces = _detect(img, DET)
    det = next(e.module for e in model_cache.entries() if e.kind == "onnx-detector")
    embed_faces(faces, REC)
    assert _kinds() == [*SHAPE, "onnx-recogniser"]
    assert det.session is None and _ours_in_comfy() == 1 + len(SHAPE)  # evicted: closed and out of ComfyUI's list


def test_a_freed_adapter_held_by_a_node_output_is_taken_back(tiny_model):
    """An IPADAPTER output outlives a model unload in ComfyUI's output cache; applying it again re-registers it."""
    from facecond.nodes.ipadapter.adapter import ApplyIPAdapter, IPAdapterEncode, LoadIPAdapter, cross_attention_layers
    from facecond.py.faces.types import FaceEmbeds
    from facecond_dev.random_weights import random_state_dict

    layers = cross_attention_layers(tiny_model[0])
    sd = random_state_dict("faceid", 128, [inner for _, inner, _ in layers], cross_dim=layers[0][2], seed=1, scale=0.5)
    folder = folder_paths.get_folder_paths("ipadapter")[0]
    os.makedirs(folder, exist_ok=True)
    save_file(sd, os.path.join(folder, "ipa_cache_test.safetensors"))
    adapter = LoadIPAdapter().load("ipa_cache_test.safetensors")[0]
    x = torch.nn.functional.normalize(torch.randn(2, 128, generator=torch.Generator().manual_seed(0)), dim=-1)
    embeds = IPAdapterEncode().encode(adapter, "center", face_embeds=FaceEmbeds(x, "t", True, (0, 1)))[0]

    def terms():
        m = ApplyIPAdapter().apply(tiny_model[0], adapter, embeds, 1.0, 0.0, 1.0)[0]
        patches = m.model_options["transformer_options"]["patches_replace"]["attn2"]
        return [t.k for p in patches.values() for t in p.terms]

    first = terms()
    assert [e.kind for e in model_cache.entries()] == ["ipadapter"]
    mm.unload_all_models()
    assert model_cache.entries() == []
    again = terms()
    assert len(model_cache.entries()) == 1 and all(torch.equal(a, b) for a, b in zip(first, again))


def test_describe_is_safe_while_another_thread_loads_and_unloads(tmp_path):
    """GET /facecond/models runs on the server's event-loop thread while the executor thread loads models: listing
    must never see the cache half-changed (it raised 'OrderedDict mutated during iteration')."""
    import threading

    paths = []
    for i in range(model_cache.MAX_ENTRIES + 4):
        paths.append(tmp_path / f"p{i}.safetensors")
        _projection_file(paths[-1], seed=i)
    errors, stop = [], threading.Event()

    def lister():
        while not stop.is_set():
            try:
                for row in model_cache.describe():
                    assert row["kind"] == "face0-projection" and row["bytes"] > 0
            except Exception as e:  # collected and reported below
                errors.append(e)
                return

    t = threading.Thread(target=lister)
    t.start()
    try:
        for _ in range(4):  # 56 loads, each evicting one: the lister sees the cache change throughout
            for p in paths:  # more files than MAX_ENTRIES: every load also evicts one
                model_cache.load("face0-projection", p, load_projection, lambda m: m)
            model_cache.clear()
    finally:
        stop.set()
        t.join()
    assert not errors, f"describe() failed while the cache changed: {errors[0]!r}"
