"""``scripts/demo.py`` (what ``make demo`` runs) as a new user runs it, in a subprocess on the ComfyUI under test.

A machine with nothing but the package registries: FACECOND_SHARED points at an empty folder (no ../shared: no
test pack, no TAESD, no photos) and FACECOND_OFFLINE=1 (no model hub). The demo must still run the default example
end to end (photo from scikit-image, MTCNN from facenet-pytorch, dlib's ResNet from PyPI, the tiny checkpoint with a
random TAESD) and write its images into a numbered folder. It is pointed at this host's own ComfyUI tree as a
user's ComfyUI (--comfyui): that tree must not change (no file newer than before the run). SIGTERM once the
server is up: the server process ends and the temp base is removed, with no traceback.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from facecond_dev import host

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))


def _env(tmp_path: Path) -> dict:
    empty = tmp_path / "no_shared"
    empty.mkdir(exist_ok=True)
    return dict(os.environ, FACECOND_SHARED=str(empty), FACECOND_OFFLINE="1", FACECOND_HOST=str(host.HOST_DIR),
                PYTHONUNBUFFERED="1")


def _cmd(tmp_path: Path, *extra: str) -> list[str]:
    return [sys.executable, "-P", str(ROOT / "scripts" / "demo.py"), "--out", str(tmp_path / "out"), *extra]


def _newer_than(root: Path, t: float) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            try:
                if p.lstat().st_mtime > t:
                    found.append(str(p))
            except OSError:
                continue
    return found


@pytest.mark.skipif(host.comfy_version()[:2] != (0, 3), reason="the end-to-end demo run costs 40-60 s on 2 cores: "
                    "run once, on the default demo host (ComfyUI 0.3.75); on 0.28 `make demo HOST=.host/comfyui-0.28`")
def test_demo_without_shared_offline_writes_images_and_nothing_into_comfyui(tmp_path):
    tree = host.comfy_dir()
    before = time.time()
    time.sleep(0.05)
    proc = subprocess.run(_cmd(tmp_path, "--comfyui", str(tree), "--python", sys.executable), env=_env(tmp_path),
                          capture_output=True, text=True, timeout=900, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    folder = Path(proc.stdout.strip().splitlines()[-1])
    assert folder.parent == tmp_path / "out" and folder.name == "001-" + host.example_workflow(
        "face0_single_photo").stem, folder
    images = sorted(folder.glob("*.png"))
    assert images, out[-3000:]
    with Image.open(images[0]) as im:
        assert im.size == (64, 64)  # the demo size on the stand-in checkpoint
    assert "MISSING checkpoints/v1-5-pruned-emaonly-fp16.safetensors" in out
    assert "facenet/20180402-114759-vggface2.pt: dlib_resnet_v1 instead" in out, out[-3000:]
    assert "scikit-image's astronaut()" in out and "noise-like" in proc.stdout
    assert "Traceback" not in out
    assert _newer_than(tree, before) == []


def test_numbered_folders_never_overwrite(tmp_path):
    import demo

    wf = Path("x/face0_single_photo.json")
    first = demo._numbered_folder(tmp_path, wf)
    (first / "12-SaveImage-1.png").write_bytes(b"a")
    (tmp_path / "007-other").mkdir()
    second = demo._numbered_folder(tmp_path, wf)
    assert (first.name, second.name) == ("001-face0_single_photo", "008-face0_single_photo")
    assert (first / "12-SaveImage-1.png").read_bytes() == b"a"


@pytest.mark.parametrize("sig", [signal.SIGTERM])
def test_sigterm_stops_the_server_and_removes_the_base(tmp_path, sig):
    proc = subprocess.Popen(_cmd(tmp_path), env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines = []
    for line in proc.stdout:  # the extra_model_paths line names the base; the server is being started then
        lines.append(line)
        if "starting ComfyUI" in line:
            break
    base = next((Path(m[0]) for m in map(re.compile(r"/\S*facecond-demo-\w+").search, lines) if m), None)
    assert base is not None and base.is_dir(), "".join(lines)[-3000:]
    server: list[int] = []
    deadline = time.monotonic() + 120
    while not server and time.monotonic() < deadline:  # SIGTERM while ComfyUI starts up
        server = [pid for pid in _pids() if f"--base-directory {base}" in _cmdline(pid)]
        time.sleep(0.1)
    assert server, "no ComfyUI process with the base"
    proc.send_signal(sig)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, rest[-3000:]
    assert "stopped by SIGTERM" in rest and "Traceback" not in rest, rest[-3000:]
    assert not base.exists()
    assert [pid for pid in server if pid in _pids() and str(base) in _cmdline(pid)] == []


def _pids() -> set[int]:
    return {int(p) for p in os.listdir("/proc") if p.isdigit()}


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_between_the_launch_and_the_pid_record_still_stops_the_server(tmp_path, sig):
    """The demo's race, made deterministic: the signal is raised after Popen has started the child and before
    ComfyServer.start() stores it. Held back until the child is recorded, its handler (here as the demo's: an
    exception) then unwinds through the caller's ``finally: server.stop()``, which finds and ends the child."""

    class Stopped(Exception):
        pass

    launched: list[int] = []

    class SignalAtLaunch(host.ComfyServer):
        def command(self):  # a real child that would outlive us, without the cost of a ComfyUI start-up
            return [sys.executable, "-c", "import time; time.sleep(600)"]

        def _spawn(self, env):
            proc = super()._spawn(env)
            launched.append(proc.pid)
            signal.raise_signal(sig)  # the child exists; start() has not recorded it yet
            return proc

    def on_signal(signum, _frame):
        raise Stopped(signum)

    server = SignalAtLaunch(tmp_path)
    previous = signal.signal(sig, on_signal)
    try:
        with pytest.raises(Stopped):
            try:
                server.start(timeout=600)
            finally:
                server.stop()
    finally:
        signal.signal(sig, previous)
        if launched and (server.proc is None or server.proc.poll() is None):  # the bug: the child survived
            os.killpg(launched[0], signal.SIGKILL)
    assert server.proc is not None and server.proc.pid == launched[0]  # recorded before the handler ran
    assert server.proc.returncode == -signal.SIGTERM  # ended by stop() (and reaped)
