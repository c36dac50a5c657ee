"""Queue an example workflow on a headless ComfyUI, show its progress, and say what the images are and where.

    python -P scripts/demo.py [--workflow example_workflows/X.json] [--comfyui /path/to/ComfyUI [--python PY]]
                              [--models DIR] [--image face.jpg ...] [--out DIR] [--size auto|demo|full]

Runs on a machine with nothing but the package registries. Before queueing it lists the real weights the
workflow names, which are in place (read from ``--models``, default: the ``models`` folder of the ComfyUI that
runs, read-only through an extra_model_paths file) and which are missing, with where to put them. Each missing
one gets a stand-in in the throw-away base directory (``facecond_dev/demo_stage.py``): the tiny random SD1.5
checkpoint, random LoRAs / IP-Adapter / genderage, an untrained Face0 projection, and for the face recogniser
dlib's ResNet (weights on PyPI) with MTCNN (weights in facenet-pytorch); FaceNet VGGFace2 is fetched (verified,
into ``<host>/cache/models/facenet``) when the network allows. On the stand-in checkpoint the graph runs at the
demo size (64 px, 2 steps for samplers and trainers) and its pictures are noise: that shows the graph runs,
not what the method does. Nothing is written into ``--comfyui`` or ``--models``; the images are copied to
``--out``/NNN-<workflow>/ (a new number each run). SIGINT and SIGTERM stop the server and remove the base, whenever
they land: while ComfyUI is launched or stopped they are held back until its process is recorded or gone
(``facecond_dev/signals.py``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run with python -P: the script dir is not on the path
from facecond_dev import demo_stage as stage
from facecond_dev import host, signals
from facecond_dev.client import ComfyClient, PromptRejected, ui_to_api

log = logging.getLogger("facecond.demo")
DEFAULT_WORKFLOW = host.REPO / "example_workflows" / "face0_single_photo.json"
DOWNLOADS = host.HOST_DIR / "cache" / "models"  # the demo's own downloads (FaceNet), kept between runs
MODEL_FOLDERS = ["checkpoints", "loras", "vae", "clip", "clip_vision", "ipadapter", "embeddings", "facenet",
                 "insightface"]


class Stopped(Exception):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _on_signal(signum, _frame):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not break the clean-up
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Stopped(signum)


def _extra_model_paths(base: Path, models: Path) -> Path:
    """A yaml that adds the user's models folders and the demo's downloads to the throw-away base (read-only)."""
    lines = ["user_models:", f"  base_path: {models}"] + [f"  {f}: {f}" for f in MODEL_FOLDERS]
    lines += ["  facecond_face0: facecond/face0", "  facecond_embeds: facecond/embeds",
              "demo_downloads:", f"  base_path: {DOWNLOADS}", "  facenet: facenet"]
    path = base / "extra_model_paths.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _variant_for_host(workflow: Path, comfyui: str | None) -> Path:
    """An example of ours in the variant for the ComfyUI that will run it (README, "Supported ComfyUI versions")."""
    if workflow.resolve().parent != host.EXAMPLES_DIR.resolve():
        return workflow
    version = host.comfy_version(comfyui)
    picked = host.example_workflow(workflow.name, version)
    if picked.name != workflow.name:
        log.info("ComfyUI %s: using %s (the variant for this version)", ".".join(map(str, version)), picked.name)
    return picked


def _tiny_checkpoint() -> Path:
    """The tiny random SD1.5 checkpoint (cached in the pinned host; built with that host's ComfyUI classes)."""
    data = host.shared_data()
    real_taesd = data is not None and (data / "models" / "taesd").is_dir()
    cached = host.HOST_DIR / "cache" / ("tiny_sd15.safetensors" if real_taesd else "tiny_sd15_random_taesd.safetensors")
    if not cached.exists():
        log.info("building the tiny random SD1.5 checkpoint (once; %s TAESD)", "real" if real_taesd else "random")
        host.import_comfy(None)
    return host.tiny_checkpoint_path() if real_taesd else _random_taesd_checkpoint(cached)


def _random_taesd_checkpoint(path: Path) -> Path:
    from facecond_dev.tiny_model import write_tiny_checkpoint

    return write_tiny_checkpoint(path, taesd_dir=None)


def _fetch_facenet() -> bool:
    """FaceNet VGGFace2 into DOWNLOADS/facenet, verified (the weights manifest); False when it cannot be had."""
    stage.pack_py()
    from facecond.py.weights import fetch, manifest

    entry = manifest.get_entry(stage.FACENET)
    try:
        fetch.ensure_weight(entry, [DOWNLOADS / "facenet"], node="demo", timeout=30)
        return True
    except (manifest.WeightsError, OSError) as e:
        log.info("FaceNet VGGFace2 could not be fetched (%s): %s", type(e).__name__, str(e).splitlines()[0][:200])
        return False


class LogFollower(threading.Thread):
    """Copies what the ComfyUI server writes to its log onto this terminal (its progress bars included)."""

    def __init__(self, path: Path):
        super().__init__(daemon=True)
        self.path, self.done = path, threading.Event()

    def run(self):
        pos = 0
        while True:
            finished = self.done.is_set()
            try:
                with open(self.path, "rb") as f:
                    f.seek(pos)
                    chunk = f.read()
            except OSError:
                chunk = b""
            if chunk:
                pos += len(chunk)
                sys.stderr.buffer.write(chunk)
                sys.stderr.flush()
            if finished:
                return
            self.done.wait(0.2)


def _numbered_folder(out: Path, workflow: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    taken = [int(p.name.split("-", 1)[0]) for p in out.iterdir() if p.name.split("-", 1)[0].isdigit()]
    for n in range(max(taken, default=0) + 1, max(taken, default=0) + 1000):
        folder = out / f"{n:03d}-{workflow.stem}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise RuntimeError(f"no free numbered folder in {out}")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workflow", default=str(DEFAULT_WORKFLOW), help="UI-format workflow JSON to queue")
    ap.add_argument("--comfyui", default=None, help="an existing ComfyUI folder to run (default: the pinned host)")
    ap.add_argument("--python", default=sys.executable, help="Python of that ComfyUI (default: this one)")
    ap.add_argument("--models", default=None, help="models folder with your real weights, read-only "
                    "(default: <ComfyUI>/models of the ComfyUI that runs)")
    ap.add_argument("--image", action="append", default=[], help="face photo(s) for the LoadImage nodes, in turn")
    ap.add_argument("--out", default="demo_output", help="folder for the numbered result folders")
    ap.add_argument("--size", choices=("auto", "demo", "full"), default="auto",
                    help="demo: 64 px, 2 steps; full: the workflow's own; auto: demo on the stand-in checkpoint")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the workflow")
    args = ap.parse_args(argv)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _on_signal)
    base = None
    try:
        workflow = _variant_for_host(Path(args.workflow), args.comfyui)
        with signals.deferred():  # recorded before a signal can stop us: the finally below removes it
            base = Path(tempfile.mkdtemp(prefix="facecond-demo-"))
        return _run(args, workflow, base)
    except Stopped as e:
        log.info("demo: stopped by %s; ComfyUI ended and %s removed", e, base)
        return 128 + e.signum
    except (FileNotFoundError, RuntimeError, TimeoutError) as e:  # no ComfyUI there, a bad workflow, no start-up
        log.error("demo: %s", e)
        return 1
    finally:
        if base is not None:
            shutil.rmtree(base, ignore_errors=True)


def _run(args, workflow: Path, base: Path) -> int:
    comfy_root = host.comfy_dir(args.comfyui)
    models = Path(args.models).resolve() if args.models else comfy_root.resolve() / "models"
    host.prepare_base(base, host.REPO, "facecond", tiny_checkpoint=False)
    names = sorted(host.workflow_input_images(workflow))
    stage.write_photos(base, names, [Path(p) for p in args.image])
    if not args.image and names:
        log.info("photo: scikit-image's astronaut() (Eileen Collins, NASA, public domain), as %s", ", ".join(names))
    extra = ("--extra-model-paths-config", str(_extra_model_paths(base, models)))
    data = host.shared_data()
    if data is not None and (data / "models" / "insightface_testpack").is_dir():  # our machines: a 2nd recogniser
        pack = base / "models" / "insightface" / "models" / host.TEST_PACK
        pack.parent.mkdir(parents=True, exist_ok=True)
        pack.symlink_to(data / "models" / "insightface_testpack", target_is_directory=True)
    env_note = "" if args.comfyui is None else f" (your ComfyUI {comfy_root}, read-only)"
    log.info("starting ComfyUI %s%s on the base %s; its output follows",
             ".".join(map(str, host.comfy_version(args.comfyui))), env_note, base)
    os.environ["PYTHONDONTWRITEBYTECODE"] = "1"  # nothing written into the ComfyUI tree, not even __pycache__
    server = host.ComfyServer(base, comfy_root=args.comfyui, python=args.python, extra_args=extra)
    follower = LogFollower(server.log_path)
    follower.start()
    try:
        server.start(timeout=300)
        return _queue(args, workflow, base, models, server)
    finally:
        server.stop()
        follower.done.set()
        follower.join(5)


def _queue(args, workflow: Path, base: Path, models: Path, server: host.ComfyServer) -> int:
    client = ComfyClient(server.url, base)
    prompt = ui_to_api(json.loads(workflow.read_text()), client.object_info())
    roots = [models, DOWNLOADS]
    needs = stage.needs(prompt)
    facenet = [n for n in needs if n.folder == "facenet"]
    if facenet and not stage.find(facenet[0], roots) and os.environ.get("FACECOND_OFFLINE", "") in ("", "0"):
        log.info("fetching FaceNet VGGFace2 (the weights manifest) into %s", DOWNLOADS / "facenet")
        _fetch_facenet()
    missing = [n for n in needs if not stage.find(n, roots)]
    lines = [f"real weights {workflow.name} reads (from {models}):"]
    for n in {n.relpath: n for n in needs}.values():
        where = stage.find(n, roots)
        lines.append(f"  {'here   ' if where else 'MISSING'} {n.relpath}  ({n.what}; node {n.node} {n.class_type})")
    if missing:
        lines.append(f"  put missing files into {models}/<folder shown> (README, 'Weights'); this run uses stand-ins:")
    ckpt = None
    recogniser = None
    done: set[str] = set()
    for n in missing:
        label = f"    {n.relpath}: "
        if n.class_type in ("FacecondFaceEmbed", "FacecondFaceDetectCrop"):
            recogniser = recogniser or stage.pick_recogniser(client.object_info(), facenet_here=False)
            if recogniser is None:
                log.info("\n".join(lines))
                log.error("demo: no face recogniser here: pip install dlib-bin face-recognition-models "
                          "(scripts/setup_host.sh installs them), or put FaceNet into %s/facenet", models)
                return 1
            what = stage.switch_face_model(prompt, n, recogniser)
        else:
            ckpt = ckpt or _tiny_checkpoint()
            what = stage.write_stand_in(n, base, ckpt, prompt) if n.relpath not in done else ""
        if n.relpath not in done:
            lines.append(label + what)
        done.add(n.relpath)
    log.info("\n".join(lines))
    on_stand_in = any(n.folder == "checkpoints" for n in missing)
    if args.size == "demo" or (args.size == "auto" and on_stand_in):
        changed = stage.demo_size(prompt)
        if changed:
            why = "the checkpoint is the tiny random stand-in" if on_stand_in else "--size demo"
            log.info("demo size (%s): %s", why, "; ".join(sorted(set(changed))))
    client.object_info(refresh=True)
    try:
        result = client.run(prompt, timeout=args.timeout)
    except PromptRejected as e:
        for node_id, info in e.details.get("node_errors", {}).items():
            for err in info.get("errors", []):
                log.error("demo: node %s (%s): %s", node_id, info.get("class_type"), err.get("details"))
        log.error("demo: ComfyUI refused %s: put the files it names into %s (README, 'Weights')", workflow.name, models)
        return 1
    if result.status != "success":
        err = result.error or {}
        log.error("demo: the workflow failed in %s (node %s): %s", err.get("node_type"), err.get("node_id"),
                  err.get("exception_message", result.messages))
        return 1
    return _report(args, workflow, prompt, result, client, on_stand_in)


def _report(args, workflow: Path, prompt: dict, result, client: ComfyClient, on_stand_in: bool) -> int:
    folder = _numbered_folder(Path(args.out).resolve(), workflow)
    written = []
    for node_id, node_output in sorted(result.outputs.items()):
        for i, img in enumerate(node_output.get("images", [])):
            src = client.base_dir / img.get("type", "output") / img.get("subfolder", "") / img["filename"]
            kind = prompt.get(node_id, {}).get("class_type", "node")
            dest = folder / f"{int(node_id):02d}-{kind}-{i + 1}{src.suffix}"
            shutil.copyfile(src, dest)
            written.append((dest, kind, img.get("type", "output")))
    print(f"\ndemo: {workflow.name} ran; {len(written)} image(s) in {folder}:")
    for dest, kind, typ in written:
        print(f"  {dest.name}  ({'saved' if typ == 'output' else 'preview'} by {kind}; {stage.image_stats(dest)})")
    if on_stand_in:
        print("These pictures are noise-like: the checkpoint is the tiny random stand-in (and any other missing "
              "weights too), run at the demo size. They show the graph runs end to end, not what the method does. "
              "Put the weights listed MISSING above in place and run again for real pictures.")
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
