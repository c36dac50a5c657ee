"""nodes/model_paths.py against the real in-process ComfyUI folder_paths (FetchWeights: tests/nodes/weights/)."""

from __future__ import annotations

import hashlib
import http.server
import os
import shutil
import threading
from pathlib import Path

import folder_paths
import pytest

from facecond.nodes import model_paths
from facecond.py.weights import manifest as weights

EXPECTED = {
    "facenet": "facenet", "insightface": "insightface", "facecond_face0": "facecond/face0",
    "facecond_celebbasis": "facecond/celebbasis", "facecond_aggregators": "facecond/aggregators",
    "facecond_embeds": "facecond/embeds",
}


def test_folders_registered_under_models_dir(comfy_base):
    for name, sub in EXPECTED.items():
        default = os.path.join(folder_paths.models_dir, *sub.split("/"))
        assert default in folder_paths.get_folder_paths(name)
        assert Path(folder_paths.models_dir).resolve() == (comfy_base / "models").resolve()
    assert ".onnx" in folder_paths.folder_names_and_paths["insightface"][1]
    assert folder_paths.folder_names_and_paths["facecond_embeds"][1] == {".safetensors"}


def test_registration_is_idempotent_and_keeps_user_paths(monkeypatch, tmp_path):
    before = {n: list(folder_paths.get_folder_paths(n)) for n in EXPECTED}
    model_paths.register_model_folders()
    model_paths.register_model_folders()
    assert {n: folder_paths.get_folder_paths(n) for n in EXPECTED} == before

    # what extra_model_paths.yaml does before custom nodes load: the user's folder, no extension filter
    monkeypatch.delitem(folder_paths.folder_names_and_paths, "facecond_face0")
    folder_paths.add_model_folder_path("facecond_face0", str(tmp_path / "shared_face0"))
    model_paths.register_model_folders()
    paths, exts = folder_paths.folder_names_and_paths["facecond_face0"]
    assert paths == [str(tmp_path / "shared_face0"), os.path.join(folder_paths.models_dir, "facecond", "face0")]
    assert exts == {".safetensors", ".pt", ".pth", ".bin"}


def test_package_weight_resolves_to_the_installed_file():
    pytest.importorskip("facenet_pytorch")
    path = model_paths.resolve_weight("mtcnn_onet", allow_download=False)
    assert Path(path).name == "onet.pt" and weights.sha256_file(path) == weights.get_entry("mtcnn_onet").sha256


def test_missing_weight_offline_names_node_file_folder_and_url(monkeypatch):
    monkeypatch.setenv("FACECOND_OFFLINE", "1")
    entry = weights.get_entry("facenet_vggface2")
    folder = folder_paths.get_folder_paths("facenet")[0]
    if os.path.exists(os.path.join(folder, entry.filename)):
        pytest.skip("the real VGGFace2 weights are installed in this ComfyUI")
    with pytest.raises(weights.WeightsError) as info:
        model_paths.resolve_weight("facenet_vggface2", node="FacecondFaceEmbed")
    msg = str(info.value)
    assert msg.startswith("FacecondFaceEmbed:")
    assert f"put {entry.filename} into {folder} (download it from {entry.url})" in msg
    assert not os.path.exists(os.path.join(folder, entry.filename))


class _OneFile(http.server.BaseHTTPRequestHandler):
    body = b"facecond projection" * 512

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)


def test_resolve_downloads_into_first_folder_path_with_progress_bar(monkeypatch):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _OneFile)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        raw = {"name": "test projection", "kind": "file", "filename": "test_projection.safetensors",
               "url": f"http://127.0.0.1:{srv.server_address[1]}/p", "size": len(_OneFile.body),
               "sha256": hashlib.sha256(_OneFile.body).hexdigest(), "license": "MIT", "folder": "facecond_face0",
               "nodes": ["FacecondTest"], "description": "served by this test"}
        manifest = weights.parse_manifest({"weights": {"test_projection": raw}})
        monkeypatch.setattr(weights, "load_manifest", lambda *a, **k: manifest)
        first = folder_paths.get_folder_paths("facecond_face0")[0]
        before = set(os.listdir(first)) if os.path.isdir(first) else set()  # other tests share this base
        path = model_paths.resolve_weight("test_projection")
        assert path == os.path.join(first, "test_projection.safetensors")
        assert Path(path).read_bytes() == _OneFile.body
        assert set(os.listdir(first)) - before == {"test_projection.safetensors"}  # no temp file left
        os.remove(path)
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)


def test_verify_user_file_checks_known_names_only():
    pytest.importorskip("facenet_pytorch")
    folder = Path(folder_paths.get_folder_paths("facenet")[0])
    folder.mkdir(parents=True, exist_ok=True)
    try:
        shutil.copy(weights.package_file(weights.get_entry("mtcnn_pnet")), folder / "pnet.pt")
        assert model_paths.verify_user_file("facenet", "pnet.pt") == str(folder / "pnet.pt")
        (folder / "rnet.pt").write_bytes(b"not the real rnet")
        with pytest.raises(weights.WeightsError) as info:
            model_paths.verify_user_file("facenet", "rnet.pt")
        assert str(folder / "rnet.pt") in str(info.value) and weights.get_entry("mtcnn_rnet").url in str(info.value)
        pack = Path(folder_paths.get_folder_paths("insightface")[0]) / "models" / "buffalo_l"
        pack.mkdir(parents=True, exist_ok=True)
        (pack / "det_10g.onnx").write_bytes(b"not scrfd")
        with pytest.raises(weights.WeightsError, match=r"wrong size .* expected 16923827"):
            model_paths.verify_user_file("insightface", "models/buffalo_l/det_10g.onnx")
        shutil.rmtree(pack)
        (folder / "my_own.pt").write_bytes(b"anything")
        assert model_paths.verify_user_file("facenet", "my_own.pt") == str(folder / "my_own.pt")
    finally:
        for name in ("pnet.pt", "rnet.pt", "my_own.pt"):
            (folder / name).unlink(missing_ok=True)


def test_manifest_names_real_nodes():
    """Each published weight names nodes that exist (slots for future files may name planned nodes)."""
    import facecond

    for entry in weights.load_manifest().values():
        if entry.url:
            missing = set(entry.nodes) - set(facecond.NODE_CLASS_MAPPINGS)
            assert not missing, f"{entry.id} names unknown nodes {missing}"
