"""py/weights/manifest.py: manifest, sha256 cache, downloads against a real loopback HTTP server, zips, safe loading."""

from __future__ import annotations

import hashlib
import http.server
import io
import itertools
import json
import logging
import os
import socket
import struct
import threading
import zipfile
from pathlib import Path

import pytest
import torch

from facecond.py.weights import fetch
from facecond.py.weights import manifest as weights

GOOD = bytes(range(256)) * 1000  # 256,000 bytes
GOOD_SHA = hashlib.sha256(GOOD).hexdigest()


def _zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


PACK_FILES = {"det.onnx": b"detector" * 100, "rec.onnx": b"recogniser" * 100}
PACK_ZIP = _zip_bytes({"mypack/": b"", **{f"mypack/{k}": v for k, v in PACK_FILES.items()}})


class _Handler(http.server.BaseHTTPRequestHandler):
    stall = threading.Event()  # set at teardown so a stalled handler ends

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _head(self, length: int):
        self.send_response(200)
        self.send_header("Content-Length", str(length))
        self.end_headers()

    def do_GET(self):
        self.server.hits.append(self.path)
        if self.path == "/good.bin":
            self._head(len(GOOD))
            self.wfile.write(GOOD)
        elif self.path == "/pack.zip":
            self._head(len(PACK_ZIP))
            self.wfile.write(PACK_ZIP)
        elif self.path == "/truncated.bin":  # promises more than it sends, then closes
            self._head(len(GOOD))
            self.wfile.write(GOOD[:1000])
        elif self.path == "/wronghash.bin":
            self._head(len(GOOD))
            self.wfile.write(GOOD[::-1])
        elif self.path == "/dies.bin":  # half the body, then a TCP reset
            self._head(len(GOOD))
            self.wfile.write(GOOD[: len(GOOD) // 2])
            self.wfile.flush()
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        elif self.path == "/stall.bin":  # a little data, then silence (bounded wait)
            self._head(len(GOOD))
            self.wfile.write(GOOD[:100])
            self.wfile.flush()
            self.stall.wait(timeout=10)
        else:
            self.send_error(404, "Not Found")


@pytest.fixture(scope="module")
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.hits = []
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv, f"http://127.0.0.1:{srv.server_address[1]}"
    _Handler.stall.set()
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


def _entry(url: str | None, *, sha: str | None = GOOD_SHA, size: int | None = len(GOOD), **extra):
    raw = {"name": "test weight", "kind": "file", "filename": "good.bin", "url": url, "sha256": sha, "size": size,
           "license": "MIT", "folder": "facecond_face0", "nodes": ["FacecondTest"], "description": "a test file"}
    raw.update(extra)
    return weights.parse_manifest({"weights": {"test_weight": raw}})["test_weight"]


def test_download_good_file_lands_with_right_bytes(server, tmp_path):
    _, base = server
    seen = []
    path = fetch.download_file(f"{base}/good.bin", tmp_path / "good.bin", sha256=GOOD_SHA, size=len(GOOD),
                                 progress=lambda done, total: seen.append((done, total)))
    assert path.read_bytes() == GOOD
    assert os.listdir(tmp_path) == ["good.bin"]  # no temp file left
    assert seen[-1] == (len(GOOD), len(GOOD)) and all(a[0] < b[0] for a, b in itertools.pairwise(seen))


@pytest.mark.parametrize("name,reason", [
    ("truncated.bin", "truncated download"), ("wronghash.bin", "sha256 mismatch"), ("missing.bin", "404"),
    ("dies.bin", "reset|truncated"), ("stall.bin", "timed out")])
def test_failed_download_leaves_nothing_and_says_what_to_do(server, tmp_path, name, reason):
    _, base = server
    url = f"{base}/{name}"
    dest = tmp_path / "good.bin"
    with pytest.raises(weights.WeightsError, match=reason) as info:
        fetch.download_file(url, dest, sha256=GOOD_SHA, size=len(GOOD), timeout=0.5)
    assert os.listdir(tmp_path) == []  # no partial, no temp file
    msg = str(info.value)
    assert str(dest) in msg and GOOD_SHA in msg and url in msg and str(tmp_path) in msg


def test_ensure_weight_downloads_once_then_verifies_from_disk(server, tmp_path):
    srv, base = server
    entry = _entry(f"{base}/good.bin")
    first, second = tmp_path / "first", tmp_path / "second"
    path = fetch.ensure_weight(entry, [first, second])
    assert path == first / "good.bin" and path.read_bytes() == GOOD
    hits = len(srv.hits)
    assert fetch.ensure_weight(entry, [second, first]) == path  # found in any folder, no new request
    assert len(srv.hits) == hits


def test_offline_switch_forbids_downloads(server, tmp_path, monkeypatch):
    srv, base = server
    entry = _entry(f"{base}/good.bin")
    hits = len(srv.hits)
    monkeypatch.setenv("FACECOND_OFFLINE", "1")
    for allow in (None, True):  # the environment variable wins over the argument
        with pytest.raises(weights.WeightsError) as info:
            fetch.ensure_weight(entry, [tmp_path], allow_download=allow, node="FacecondTest")
        assert f"put good.bin into {tmp_path} (download it from {base}/good.bin)" in str(info.value)
        assert str(info.value).startswith("FacecondTest:")
    monkeypatch.delenv("FACECOND_OFFLINE")
    with pytest.raises(weights.WeightsError, match=r"put good\.bin into"):
        fetch.ensure_weight(entry, [tmp_path], allow_download=False)
    assert len(srv.hits) == hits and os.listdir(tmp_path) == []


def test_hash_cache_skips_reread_until_mtime_changes(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 4096)
    first = weights.sha256_file(f)
    st = os.stat(f)
    f.write_bytes(b"b" * 4096)  # same size; put the old mtime back: the cache key is unchanged
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert weights.sha256_file(f) == first  # answered from the cache, the file was not read again
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert weights.sha256_file(f) == hashlib.sha256(b"b" * 4096).hexdigest()


def test_verify_mismatch_names_path_hashes_and_url(tmp_path):
    f = tmp_path / "good.bin"
    f.write_bytes(GOOD[::-1])
    with pytest.raises(weights.WeightsError) as info:
        weights.verify_file(f, GOOD_SHA, len(GOOD), url="https://example.org/good.bin")
    msg = str(info.value)
    assert str(f) in msg and GOOD_SHA in msg and hashlib.sha256(GOOD[::-1]).hexdigest() in msg
    assert "https://example.org/good.bin" in msg
    with pytest.raises(weights.WeightsError, match="wrong size"):
        weights.verify_file(f, GOOD_SHA, len(GOOD) + 1)


def test_unverified_entry_is_used_with_a_warning(tmp_path, caplog):
    entry = _entry(None, sha=None, size=None)
    (tmp_path / "good.bin").write_bytes(GOOD)
    with caplog.at_level(logging.WARNING, logger="facecond"):
        assert fetch.ensure_weight(entry, [tmp_path]) == tmp_path / "good.bin"
    assert "unverified" in caplog.text
    with pytest.raises(weights.WeightsError, match="not published yet"):
        fetch.ensure_weight(entry, [tmp_path / "empty"])


def test_zip_pack_download_extracts_flat_and_verified(server, tmp_path):
    srv, base = server
    files = {k: {"sha256": hashlib.sha256(v).hexdigest(), "size": len(v)} for k, v in PACK_FILES.items()}
    entry = _entry(f"{base}/pack.zip", sha=hashlib.sha256(PACK_ZIP).hexdigest(), size=len(PACK_ZIP),
                   kind="zip", filename="mypack.zip", strip_prefix="mypack/", files=files, folder="insightface")
    path = fetch.ensure_weight(entry, [tmp_path])
    assert path == tmp_path / "models" / "mypack"
    assert {p.name: p.read_bytes() for p in path.iterdir()} == PACK_FILES
    assert sorted(os.listdir(tmp_path)) == ["models"] and os.listdir(tmp_path / "models") == ["mypack"]
    hits = len(srv.hits)
    assert fetch.ensure_weight(entry, [tmp_path], allow_download=False) == path and len(srv.hits) == hits


@pytest.mark.parametrize("evil", ["../escape.onnx", "/abs/escape.onnx", "ok/../../escape.onnx", "C:/escape.onnx"])
def test_zip_extraction_rejects_unsafe_paths(tmp_path, evil):
    archive = tmp_path / "evil.zip"
    archive.write_bytes(_zip_bytes({"fine.onnx": b"x", evil: b"y"}))
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(weights.WeightsError, match="unsafe path"):
        fetch.extract_zip(archive, root / "models" / "pack")
    assert list(root.rglob("*")) == [root / "models"]  # only the parent; nothing extracted, no temp dir
    assert not (tmp_path / "escape.onnx").exists()


def test_zip_extraction_rejects_symlinks(tmp_path):
    info = zipfile.ZipInfo("link.onnx")
    info.external_attr = 0o120777 << 16
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(info, "/etc/passwd")
    (tmp_path / "l.zip").write_bytes(buf.getvalue())
    with pytest.raises(weights.WeightsError, match="symbolic link"):
        fetch.extract_zip(tmp_path / "l.zip", tmp_path / "out" / "pack")
    assert not (tmp_path / "out" / "pack").exists()


def test_real_manifest_is_valid_and_complete():
    manifest = weights.load_manifest()
    for wid in ("facenet_vggface2", "mtcnn_pnet", "mtcnn_rnet", "mtcnn_onet", "buffalo_l", "antelopev2",
                "face0_projection_sd15", "celebbasis_mlp_sd15", "ipadapter_aggregator_selfattn"):
        assert wid in manifest
    assert manifest["buffalo_l"].where("/m") == Path("/m/models/buffalo_l")
    assert {f.name for f in manifest["antelopev2"].files} >= {"glintr100.onnx", "scrfd_10g_bnkps.onnx"}
    for e in manifest.values():
        assert all(n.startswith("Facecond") for n in e.nodes) and e.license
        assert (e.url is None) == (e.sha256 is None)  # every published file has a pinned hash
    names = [(e.folder, e.filename) for e in manifest.values()]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("field,value,match", [
    ("sha256", "ABC", "sha256 must be 64"), ("size", -3, "positive integer"), ("kind", "tar", "kind must be"),
    ("filename", "../x.pt", "plain file name"), ("license", "", "'license'"), ("nodes", "FacecondX", "'nodes'"),
    ("url", "ftp://x", "http"), ("files", {}, None)])
def test_malformed_manifest_entry_is_rejected_by_name(field, value, match):
    raw = json.loads(weights.MANIFEST_PATH.read_text())
    entry = raw["weights"]["buffalo_l"]
    entry[field] = value
    with pytest.raises(weights.ManifestError, match=match or "needs a 'files'") as info:
        weights.parse_manifest(raw)
    assert "buffalo_l" in str(info.value) and isinstance(info.value, ValueError)


def test_real_mtcnn_files_match_manifest():
    pytest.importorskip("facenet_pytorch")
    for wid in ("mtcnn_pnet", "mtcnn_rnet", "mtcnn_onet"):
        entry = weights.get_entry(wid)
        path = weights.package_file(entry)
        assert path is not None and weights.sha256_file(path) == entry.sha256
        assert path.stat().st_size == entry.size and fetch.ensure_weight(entry, []) == path
        assert all(isinstance(v, torch.Tensor) for v in weights.load_state_dict(path).values())


class _Evil:
    def __reduce__(self):
        return (Path.write_text, (_Evil.marker, "pwned"))


def test_load_state_dict_is_safe(tmp_path):
    sd = {"w": torch.arange(6.0).reshape(2, 3)}
    torch.save(sd, tmp_path / "ok.pt")
    assert torch.equal(weights.load_state_dict(tmp_path / "ok.pt")["w"], sd["w"])
    from safetensors.torch import save_file

    save_file(sd, tmp_path / "ok.safetensors")
    assert torch.equal(weights.load_state_dict(tmp_path / "ok.safetensors")["w"], sd["w"])

    _Evil.marker = tmp_path / "pwned.txt"
    torch.save({"w": sd["w"], "payload": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(weights.WeightsError, match="refusing to load"):
        weights.load_state_dict(tmp_path / "evil.pt")
    assert not _Evil.marker.exists()  # the payload never ran

    torch.save({"w": sd["w"], "note": "a string"}, tmp_path / "mixed.pt")
    with pytest.raises(weights.WeightsError, match="non-tensor entries: \\['note'\\]"):
        weights.load_state_dict(tmp_path / "mixed.pt")


def test_load_state_dict_flattens_nested_tensor_dicts(tmp_path):
    """IP-Adapter .bin files nest {"image_proj": {...}, "ip_adapter": {...}}: dotted keys come back."""
    import torch

    torch.save({"image_proj": {"proj.weight": torch.ones(2, 2)}, "ip_adapter": {"1.to_k_ip.weight": torch.zeros(3)}},
               tmp_path / "nested.bin")
    sd = weights.load_state_dict(tmp_path / "nested.bin")
    assert sorted(sd) == ["image_proj.proj.weight", "ip_adapter.1.to_k_ip.weight"]
    assert torch.equal(sd["image_proj.proj.weight"], torch.ones(2, 2))
