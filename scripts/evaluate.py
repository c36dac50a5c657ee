"""Evaluate identity methods the way their papers do: queue every identity x prompt x seed through a headless
ComfyUI, score the images (identity cosine, CLIP score, the papers' aggregates, FID/IS when asked) and write
per-image CSV/JSON plus an HTML report with plots and an image grid per identity. Examples:

    .host/venv/bin/python -P scripts/evaluate.py --out eval/ --identities people/ --preset livshits \\
        --method "face0=example_workflows/face0_single_photo.json" \\
        --method "celeb=example_workflows/celebbasis_one_photo.json subject=<alice>" \\
        --recogniser models/insightface/models/antelopev2/glintr100.onnx --clip-model clip_models/vit-l-14

    ... --url http://127.0.0.1:8188      # use a running ComfyUI (with its own models) instead of starting one

A method is ``[LABEL=]WORKFLOW [photo=NODE.input,...] [prompt=NODE.text] [seed=NODE.seed] [output=NODE]
[subject=WORDS]`` (NODE: id or title; defaults: every LoadImage, the CLIPTextEncode behind 'positive', every
seed input, every SaveImage). Prompts use ``{}`` for the person: the method's subject in the workflow
(default "a person"), ``--clip-subject`` for the CLIP score. Rerunning with the same --out resumes: finished images
(runs.jsonl) are never generated again. --score-only rescores what is there.

A slow server is waited for (--request-timeout seconds per HTTP request, --timeout per image); a server that stops
answering (refused or reset, --retries times in a row) ends the run with one line, "the ComfyUI server at URL
stopped answering (...); rerun with the same --out to resume", and exit status 1, as do a --url that is not ComfyUI
and a --method file that is not a workflow.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # python -P does not put the script's folder on the path
from facecond_dev import eval_jobs as ej
from facecond_dev import host
from facecond_dev.client import REQUEST_TIMEOUT, RETRIES, ServerError, ServerGone, WorkflowError, load_workflow
from facecond_dev.eval_protocol import parse_seeds

log = logging.getLogger("facecond.evaluate")
PRESETS = host.REPO / "evaluation" / "presets"
SAMPLER_KEYS = ("steps", "cfg", "sampler_name", "scheduler")


def load_preset(name: str | None) -> dict:
    if not name:
        return {}
    path = Path(name) if Path(name).suffix == ".json" else PRESETS / f"{name}.json"
    if not path.is_file():
        raise SystemExit(f"preset {name!r} not found (presets: {sorted(p.stem for p in PRESETS.glob('*.json'))})")
    return json.loads(path.read_text())


def pack_py():
    """The pack's ``py/`` package: the loaded pack's, else the pack's folder as a bare package (no ComfyUI)."""
    if "facecond" not in sys.modules:
        mod = types.ModuleType("facecond")
        mod.__path__ = [str(host.REPO)]
        sys.modules["facecond"] = mod
    from facecond import py

    return py


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output folder (images, runs.jsonl, report.html); reuse to resume")
    ap.add_argument("--identities", required=True, help="folder with one subfolder of photos per person")
    ap.add_argument("--method", action="append", default=[], help="a workflow under test (repeat to compare)")
    ap.add_argument("--preset", help="protocol preset: face0, livshits, kazistova or a .json file")
    ap.add_argument("--prompts", help="prompt file, one per line ({} = the person); default: the preset's")
    ap.add_argument("--seeds", help="seeds, e.g. 0-7 or 1,2,3; default: the preset's")
    ap.add_argument("--set", action="append", default=[], metavar="CLASS.input=VALUE",
                    help="override an input of every node of a class, e.g. KSampler.steps=50 (JSON values)")
    ap.add_argument("--url", action="append", default=[],
                    help="a running ComfyUI (repeat for several: the jobs are spread over them, one ComfyUI per "
                    "GPU); default: start the pack's headless host")
    ap.add_argument("--models-dir", action="append", default=[],
                    help="with --url: the servers' models folder(s), so each job's identity holds the sha256 of "
                    "the model files it names (else their names only)")
    ap.add_argument("--base", help="host mode: ComfyUI base directory (default OUT/comfy_base, tiny checkpoint)")
    ap.add_argument("--stand-ins", action="store_true", help="host mode: stand-in face models (tests, demo)")
    ap.add_argument("--quick", action="store_true", help="64x64 images and 2 steps (tests, demo)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per image")
    ap.add_argument("--request-timeout", type=float, default=REQUEST_TIMEOUT,
                    help="seconds one HTTP request to ComfyUI may take (default: FACECOND_HTTP_TIMEOUT or 300); a "
                    "status poll that times out is asked again")
    ap.add_argument("--retries", type=int, default=RETRIES,
                    help="a refused or reset status poll is asked again this many times (after 1, 2, 4 ... s) "
                    "before the run stops")
    ap.add_argument("--detector", default="mtcnn",
                    help="face detector for the identity score: mtcnn (default; facenet-pytorch's MTCNN, Face0's "
                    "detector) or an SCRFD .onnx file (insightface's detector: use it with --preprocess insightface "
                    "to reproduce FaceAnalysis)")
    ap.add_argument("--recogniser", help="face recogniser of the ID column (the one the methods are conditioned on): "
                    "an insightface-format .onnx, a FaceNet .pt, or dlib_resnet_v1")
    ap.add_argument("--independent-recogniser", default="auto",
                    help="a second recogniser, shown beside --recogniser: dlib_resnet_v1 (default when dlib-bin and "
                    "face-recognition-models are installed), a file as --recogniser, or none")
    ap.add_argument("--preprocess", default="auto", choices=("auto", "insightface", "facecond"),
                    help="detector input and crop: insightface = FaceAnalysis exactly (SCRFD letterbox, norm_crop); "
                    "facecond = the pack's resampling; auto (default): insightface for .onnx recognisers")
    ap.add_argument("--reference-mode", default="mean", choices=("mean", "max", "centroid"))
    ap.add_argument("--no-face", choices=("flag", "zero", "passthrough"),
                    help="how an image without a face counts: zero = identity 0 in every mean (default: the "
                    "preset's choice, else zero; no paper we follow states one); flag = left out of the ID and "
                    "aggregate means (CLIP still counts it); passthrough = the centre square scored as the face")
    ap.add_argument("--clip-model", help="folder of a CLIP model in the transformers CLIPModel layout")
    ap.add_argument("--clip-subject", default="a person", help='what "{}" becomes in the CLIP score\'s text')
    ap.add_argument("--aggregate", choices=("livshits", "face0"), help="default: the preset's, else livshits")
    ap.add_argument("--fid-real", help="folder of real (held-out) images: FID of each method against them")
    ap.add_argument("--inception-score", action="store_true", help="IS of each method (standard and uniform p(y))")
    ap.add_argument("--inception-weights", help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth")
    ap.add_argument("--device", default="cpu", help="device for scoring (cpu, cuda)")
    ap.add_argument("--score-only", action="store_true", help="do not generate; score and report what is there")
    return ap.parse_args(argv)


def overrides(args, preset: dict) -> dict[str, dict]:
    sets: dict[str, dict] = {}
    sampler = {k: v for k, v in preset.get("sampler", {}).items() if k in SAMPLER_KEYS}
    for cls in ("KSampler", "FacecondThreeWayCFGSampler", "KSamplerAdvanced"):
        sets.setdefault(cls, {}).update(sampler)
    # "native" (the shipped presets): each workflow keeps its EmptyLatentImage size, which the examples set to their
    # model's native size (SD1.x 512, SDXL 1024); a number forces that side on every workflow
    if preset.get("size", "native") != "native":
        sets.setdefault("EmptyLatentImage", {}).update({"width": preset["size"], "height": preset["size"]})
    if args.quick:
        for cls, vals in host.QUICK.items():
            sets.setdefault(cls, {}).update(vals)
    for item in args.set:
        target, _, value = item.partition("=")
        cls, _, inp = target.rpartition(".")
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
        sets.setdefault(cls, {})[inp] = value
    return sets


def _dlib_rec():
    pack_py()
    from facecond.py.faces import dlib_rec

    return dlib_rec


def check_fidelity(args, preset: dict) -> None:
    """FID/IS inputs checked before anything is generated: torch-fidelity installed, the Inception weights read
    (without unpickling code) and recognised, the --fid-real folder holding images."""
    if not (args.fid_real or args.inception_score or preset.get("inception_score")):
        return
    pack_py()
    from facecond.py.evaluate import fidelity

    if args.fid_real:
        real = Path(args.fid_real)
        if not real.is_dir() or not any(p.suffix.lower() in (".jpg", ".jpeg", ".png") for p in real.rglob("*")):
            raise SystemExit(f"evaluate.py: --fid-real {real}: no folder of .jpg/.png images there")
    try:
        fidelity.load_inception(args.inception_weights, "cpu")
    except (RuntimeError, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"evaluate.py: FID/IS: {e}") from None


def main(argv: list[str] | None = None) -> Path:
    """Generate, score and report; a gone or wrong server and a file that is not a workflow end it with one line
    (SystemExit, status 1) instead of a traceback."""
    try:
        return _main(argv)
    except ServerGone as e:
        raise SystemExit(f"evaluate.py: {e}; rerun with the same --out to resume") from None
    except (ServerError, WorkflowError) as e:
        raise SystemExit(f"evaluate.py: {e}") from None


def _main(argv: list[str] | None) -> Path:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    preset = load_preset(args.preset)
    prompts = (Path(args.prompts).read_text().splitlines() if args.prompts else preset.get("prompts", []))
    prompts = [p.strip() for p in prompts if p.strip() and not p.lstrip().startswith("#")]
    seeds = parse_seeds(args.seeds if args.seeds is not None else preset.get("seeds", [0]))
    if not prompts and not args.score_only:
        raise SystemExit("no prompts: give --prompts FILE or a --preset")
    args.no_face = args.no_face or preset.get("no_face", "zero")
    if args.independent_recogniser == "auto":
        dlib_rec = _dlib_rec()
        args.independent_recogniser = dlib_rec.MODEL_NAME if dlib_rec.available() and args.recogniser not in (
            "dlib", dlib_rec.MODEL_NAME) else "none"
    check_fidelity(args, preset)  # before any generation: a wrong or missing file ends the run now
    idents = ej.identities(Path(args.identities))
    try:
        specs = [ej.parse_method(s) for s in args.method]
    except ValueError as e:
        raise SystemExit(f"evaluate.py: {e}") from None
    if not specs and not args.score_only:
        raise SystemExit("give at least one --method WORKFLOW")
    for _, path, _ in specs:
        load_workflow(path)  # before a server is started: WorkflowError for a file that is not one
    run_file = out / "run.json"
    if not args.score_only:
        from facecond_dev import eval_gen

        sets = overrides(args, preset)
        run = {"preset": args.preset, "prompts": prompts, "seeds": seeds,
               "methods": {label: str(path) for label, path, _ in specs}, "set": args.set, "quick": args.quick,
               "stand_ins": args.stand_ins, "overrides": sets, "urls": args.url or ["(the pack's headless host)"]}

        def planned(jobs):  # written before the first image: a --score-only after a kill scores this run
            run["jobs"] = [j.key for j in jobs]
            tmp = run_file.with_suffix(".part")
            tmp.write_text(json.dumps(run, indent=1))
            tmp.replace(run_file)

        eval_gen.generate(args, out, specs, idents, prompts, seeds, sets, planned)
    elif run_file.is_file():
        run = json.loads(run_file.read_text())
    else:
        run = {}  # an output folder without run.json: every finished job in runs.jsonl
    from facecond_dev import eval_score

    return eval_score.score_and_report(args, out, preset, idents, run, pack_py())


if __name__ == "__main__":
    print(main())
