"""Test harness: real ComfyUI (0.3.75 or 0.28, see ``scripts/facecond_dev/host.py``), in-process and as a headless
server.

At import, ComfyUI is imported into the pytest process on the CPU with a throw-away base directory,
and the pack is imported as the package ``facecond`` (its real ``__init__``), so tests write
``from facecond.nodes.faces.detect_embed import ...``. The ``server`` fixture runs ``main.py`` with the pack linked
into its custom_nodes under an awkward folder name (the folder name must not matter).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from facecond_dev import host  # noqa: E402
from facecond_dev.client import ComfyClient  # noqa: E402

COMFY_VERSION = host.comfy_version()  # the ComfyUI under test (example variants are picked by it)

_INPROCESS_BASE = Path(tempfile.mkdtemp(prefix="facecond-inproc-"))
host.import_comfy(_INPROCESS_BASE)
host.load_pack(ROOT, "facecond")

SERVER_PACK_NAME = "facecond-pack.dev"  # a dash and a dot: loads under any folder name


def pytest_report_header(config):
    return (f"ComfyUI {'.'.join(map(str, COMFY_VERSION))} at {host.comfy_dir()} (FACECOND_HOST: {host.HOST_DIR}); "
            f"shared data: {host.shared_data() or 'absent'}{' (required)' if host.data_required() else ''}")


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_INPROCESS_BASE, ignore_errors=True)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    data = host.shared_data()
    if data is None:
        reason = f"{host.SHARED_DATA} (real test photos and models) is not present"
        if host.data_required():
            pytest.fail(f"{reason}, and FACECOND_REQUIRE_DATA=1 (CI) requires it: put the shared folder beside "
                        "the repo or point FACECOND_SHARED at it", pytrace=False)
        pytest.skip(reason)
    return data


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module, restored after. On 2 shared cores torch's second OpenMP thread spins
    against other processes (measured 0.02 s -> 0.85 s per 150 px MTCNN pass under load)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def mtcnn():
    """MTCNN with the weights shipped in facenet-pytorch (as the weights manifest resolves them)."""
    from facecond.py.faces import detect
    from facecond.py.weights import manifest as weights

    return detect.MTCNN(*(weights.package_file(weights.get_entry(f"mtcnn_{n}")) for n in ("pnet", "rnet", "onet")))


@pytest.fixture(scope="session")
def stand_in_models(comfy_base, shared_data) -> Path:
    """The in-process base with the insightface test pack (models/insightface/models/testpack) and the
    untrained Face0 projection, as the demo and the workflow tests have them."""
    host.install_stand_in_models(comfy_base)
    return comfy_base


@pytest.fixture(scope="session")
def comfy_base() -> Path:
    """The in-process ComfyUI base directory (models/, input/, output/), with the tiny checkpoint."""
    return host.prepare_base(_INPROCESS_BASE, pack_dir=None)


@pytest.fixture(scope="session")
def tiny_ckpt(comfy_base) -> str:
    """Checkpoint name (in models/checkpoints) of the tiny random SD1.5 model."""
    return host.EXAMPLE_CKPT


@pytest.fixture(scope="session")
def tiny_model(tiny_ckpt):
    """(MODEL, CLIP, VAE) of the tiny checkpoint, loaded once by ComfyUI's own loader."""
    import nodes

    return nodes.CheckpointLoaderSimple().load_checkpoint(tiny_ckpt)[:3]


FAMILIES = ("sd2", "sd2v", "sdxl")  # the tiny non-SD1.5 checkpoints (tiny_model.FAMILY_UNETS)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "family: loads a tiny SD2 / SD2-v / SDXL checkpoint (slow: full-size text encoders); "
        "scripts/test_hosts.sh runs these on the 0.28 host only unless FACECOND_FAMILY_HOSTS=all")
    config.addinivalue_line(
        "markers", "hostless: a test of the pure-torch py/ package that never reaches ComfyUI; both host venvs hold "
        "the same torch and packages (scripts/setup_host.sh pins them), so scripts/test_hosts.sh runs these on the "
        "0.28 host only unless FACECOND_ONE_HOST_HOSTS=all")
    config.addinivalue_line(
        "markers", "one_host: a CLI or harness test whose ComfyUI calls (checkpoint loading, text encoding, the "
        "denoiser, the HTTP API) other tests make on every host; scripts/test_hosts.sh runs it on the 0.28 host "
        "only unless FACECOND_ONE_HOST_HOSTS=all (the reason is written beside each mark)")
    config.addinivalue_line(
        "markers", "every_host: a family test that scripts/test_hosts.sh runs on every host all the same (an issue "
        "asks for it on both hosts)")


# A test file under tests/py (the pure-torch ``py/`` package, which imports nothing of ComfyUI) that mentions none of
# these never reaches ComfyUI: not in-process, not through a CLI or a server. It is marked ``hostless``.
HOST_WORDS = ("comfy", "facecond_dev", "nodes", "tiny_", "stand_in", "family", "server", "subprocess",
              "sys.executable")


def _hostless(path: Path, seen: dict) -> bool:
    if path not in seen:
        inside = (ROOT / "tests" / "py") in path.parents
        seen[path] = inside and not any(w in path.read_text() for w in HOST_WORDS)
    return seen[path]


def pytest_collection_modifyitems(config, items):
    seen: dict = {}
    for item in items:  # every test that loads a family checkpoint is a family test, marked or not
        if {"family", "family_model", "family_ckpt", "family_cond"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.family)
        if _hostless(Path(str(item.fspath)).resolve(), seen):  # its host fixtures' names are HOST_WORDS too
            item.add_marker(pytest.mark.hostless)


@pytest.fixture(scope="session", params=FAMILIES)
def family(request) -> str:
    """A tiny checkpoint family: sd2, sd2v, sdxl. Session-scoped, so pytest groups the tests of one family and
    holds one family's models at a time. One family only: ``@pytest.mark.parametrize("family", ["sdxl"],
    indirect=True)``."""
    return request.param


@pytest.fixture(scope="session")
def family_ckpt(comfy_base, family) -> str:
    """Checkpoint name (in models/checkpoints, the name users have: host.FAMILY_CKPTS) of the tiny ``family`` model."""
    return host.link_family_checkpoint(comfy_base, family)


@pytest.fixture(scope="session")
def family_model(family_ckpt):
    """(MODEL, CLIP, VAE) of the tiny ``family`` checkpoint, loaded once by ComfyUI's own CheckpointLoaderSimple."""
    import nodes

    return nodes.CheckpointLoaderSimple().load_checkpoint(family_ckpt)[:3]


@pytest.fixture(scope="session")
def family_cond(family_model):
    """CLIPTextEncode of "a photo of a person" with the ``family`` model's CLIP, encoded once (SDXL's CLIP-G on the
    CPU is the slow part of a family test). Copy before changing it."""
    import nodes

    return nodes.CLIPTextEncode().encode(family_model[1], "a photo of a person")[0]


@pytest.fixture(scope="session")
def tiny_controlnet(comfy_base):
    """CONTROL_NET: the tiny random SD1.5 ControlNet (tiny_model.py), loaded by ComfyUI's own loader."""
    import comfy.controlnet

    return comfy.controlnet.load_controlnet(str(host.tiny_controlnet_path()))


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> ComfyClient:
    """A headless ComfyUI server with the pack, for the whole session; a client bound to it.

    ``server.base_dir`` is its base directory; put input images in ``server.base_dir / "input"``.
    """
    base = host.prepare_base(tmp_path_factory.mktemp("server-base"), ROOT, SERVER_PACK_NAME)
    srv = host.ComfyServer(base, pack_name=SERVER_PACK_NAME)
    srv.start()
    client = ComfyClient(srv.url, base)
    client.process = srv
    yield client
    srv.stop()
    if srv.proc.returncode not in (0, -15):
        print(f"ComfyUI exited with {srv.proc.returncode}; log tail:\n{srv.log_tail()}", file=sys.stderr)
