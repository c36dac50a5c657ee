"""Queue an example workflow on a headless ComfyUI and print where the images went.

    python -P scripts/demo.py [--workflow example_workflows/X.json] [--comfyui /path/to/ComfyUI]
                              [--image face.jpg] [--out DIR]

Without --comfyui it uses the pinned host from scripts/setup_host.sh (``make demo`` sets it up) and,
where no user weights are there, the bundled stand-ins: a tiny random SD1.5 checkpoint under the name
the examples use, the small insightface test pack from ../shared/data, and an untrained Face0 projection.
Those make the graph run end to end; the pictures are noise-like until real weights are put in place
(README, "Weights"). With --comfyui, the models of that ComfyUI are used (read-only, through an
extra_model_paths file) and nothing is written into it.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run with python -P: the script dir is not on the path
from facecond_dev import host
from facecond_dev.client import ComfyClient, PromptRejected, ui_to_api

log = logging.getLogger("facecond.demo")
DEFAULT_WORKFLOW = host.REPO / "example_workflows" / "face0_single_photo.json"


def _face_photos(given: str | None) -> list[Path]:
    if given:
        return [Path(given)]
    data = host.shared_data()
    if data is not None:
        faces = data / "faces"
        return [faces / "obama" / "obama.jpg", faces / "biden" / "biden.jpg", faces / "astronaut" / "astronaut.png",
                faces / "johns" / "John_Salley" / "000179_02159509.jpg"]
    raise SystemExit("demo: no face photo: pass --image PATH (a photo with one clearly visible face)")


def _extra_model_paths(comfyui: Path, base: Path) -> Path:
    """A yaml that adds the user's models folders to the throw-away base (read-only use)."""
    folders = ["checkpoints", "loras", "vae", "clip", "clip_vision", "ipadapter", "embeddings", "facenet",
               "insightface"]
    lines = ["user_comfyui:", f"  base_path: {comfyui}"] + [f"  {f}: models/{f}" for f in folders]
    lines += ["  facecond_face0: models/facecond/face0", "  facecond_embeds: models/facecond/embeds"]
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


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workflow", default=str(DEFAULT_WORKFLOW), help="UI-format workflow JSON to queue")
    ap.add_argument("--comfyui", default=None, help="an existing ComfyUI folder to run (default: the pinned host)")
    ap.add_argument("--python", default=sys.executable, help="Python of that ComfyUI (default: this one)")
    ap.add_argument("--image", default=None, help="face photo for the workflow's LoadImage nodes")
    ap.add_argument("--out", default="demo_output", help="folder to copy the generated images to")
    args = ap.parse_args(argv)

    workflow = _variant_for_host(Path(args.workflow), args.comfyui)
    base = Path(tempfile.mkdtemp(prefix="facecond-demo-"))
    try:
        return _run(args, workflow, base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _run(args, workflow: Path, base: Path) -> int:
    extra: tuple[str, ...] = ()
    if args.comfyui:
        host.prepare_base(base, host.REPO, "facecond", tiny_checkpoint=False)
        extra = ("--extra-model-paths-config", str(_extra_model_paths(Path(args.comfyui).resolve(), base)))
    else:
        host.import_comfy(base)  # the tiny checkpoint is built with ComfyUI's own classes
        host.prepare_base(base, host.REPO, "facecond")
        host.install_stand_in_models(base)
    photos = _face_photos(args.image)
    names = sorted(host.workflow_input_images(workflow))
    host.copy_inputs(base, {name: photos[i % len(photos)] for i, name in enumerate(names)})

    log.info("starting ComfyUI (base %s)", base)
    with host.ComfyServer(base, comfy_root=args.comfyui, python=args.python, extra_args=extra) as srv:
        client = ComfyClient(srv.url, base)
        prompt = ui_to_api(json.loads(workflow.read_text()), client.object_info())
        if not args.comfyui:
            stand_in = host.use_stand_ins(prompt, base)
            if stand_in != prompt:
                log.info("face models the workflow names are not in place: using the stand-ins (%s)",
                         host.STAND_IN_RECOGNISER)
            prompt = stand_in
        try:
            result = client.run(prompt, timeout=900)
        except PromptRejected as e:
            for node_id, info in e.details.get("node_errors", {}).items():
                for err in info.get("errors", []):
                    log.error("demo: node %s (%s): %s", node_id, info.get("class_type"), err.get("details"))
            log.error("demo: ComfyUI refused %s: put the files it names into that ComfyUI's models folders "
                      "(README, 'Weights'), or run without --comfyui to use the stand-ins", workflow.name)
            return 1
        if result.status != "success":
            err = result.error or {}
            log.error("the workflow failed in %s (node %s): %s", err.get("node_type"), err.get("node_id"),
                      err.get("exception_message", result.messages))
            return 1
        out = Path(args.out).resolve()
        out.mkdir(parents=True, exist_ok=True)
        images = client.output_images(result)
        for img in images:
            shutil.copy2(img, out / img.name)
    log.info("demo: %d image(s) from %s written to %s", len(images), workflow.name, out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
