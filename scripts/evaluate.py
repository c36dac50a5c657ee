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
import os
import signal
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # python -P does not put the script's folder on the path
from facecond_dev import eval_jobs as ej
from facecond_dev import host
from facecond_dev.client import (
    REQUEST_TIMEOUT,
    RETRIES,
    ComfyClient,
    ServerError,
    ServerGone,
    WorkflowError,
    load_workflow,
)

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
    ap.add_argument("--url", help="a running ComfyUI; default: start the pack's headless host")
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
    ap.add_argument("--detector", default="mtcnn", help="mtcnn, or an SCRFD .onnx file")
    ap.add_argument("--recogniser", help="face recogniser: an insightface-format .onnx, or a FaceNet .pt")
    ap.add_argument("--reference-mode", default="mean", choices=("mean", "max", "centroid"))
    ap.add_argument("--no-face", default="flag", choices=("flag", "zero", "passthrough"))
    ap.add_argument("--clip-model", help="folder of a CLIP model in the transformers CLIPModel layout")
    ap.add_argument("--clip-subject", default="a person", help='what "{}" becomes in the CLIP score\'s text')
    ap.add_argument("--aggregate", choices=("livshits", "face0"), help="default: the preset's, else livshits")
    ap.add_argument("--fid-real", help="folder of real (held-out) images: FID of each method against them")
    ap.add_argument("--inception-score", action="store_true", help="IS of each method (standard and uniform p(y))")
    ap.add_argument("--inception-weights", help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth")
    ap.add_argument("--device", default="cpu", help="device for scoring (cpu, cuda)")
    ap.add_argument("--score-only", action="store_true", help="do not generate; score and report what is there")
    return ap.parse_args(argv)


def parse_seeds(text) -> list[int]:
    if isinstance(text, list):
        return [int(s) for s in text]
    out = []
    for part in str(text).split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b) + 1)) if b else [int(a)]
    return out


def apply_overrides(graph: dict, sets: dict[str, dict]) -> None:
    for node in graph.values():
        for key, value in sets.get(node["class_type"], {}).items():
            if key in node["inputs"] and not isinstance(node["inputs"][key], list):
                node["inputs"][key] = value


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


class Host:
    """The pack's headless ComfyUI in OUT/comfy_base; a server left by a killed run is stopped first."""

    def __init__(self, out: Path, base: Path, stand_ins: bool):
        self.pid_file = out / "comfyui.pid"
        self._stop_stale(base)
        host.import_comfy(base)
        host.load_pack(host.REPO, "facecond")
        host.prepare_base(base, host.REPO, "facecond")
        if stand_ins:
            host.install_stand_in_models(base)
        self.server = host.ComfyServer(base, pack_name="facecond")
        self.server.start()
        self.pid_file.write_text(f"{self.server.proc.pid} {base}\n")

    def _stop_stale(self, base: Path) -> None:
        try:
            pid, where = self.pid_file.read_text().split(maxsplit=1)
            cmd = Path(f"/proc/{int(pid)}/cmdline").read_bytes().decode(errors="replace")
        except (OSError, ValueError):
            return
        if str(base) in cmd and where.strip() == str(base):
            log.info("stopping the ComfyUI (pid %s) a killed run left behind", pid)
            os.killpg(int(pid), signal.SIGKILL)

    def stop(self) -> None:
        self.server.stop()
        self.pid_file.unlink(missing_ok=True)


def generate(args, out: Path, methods_specs, idents, prompts, seeds, sets) -> None:
    server = None
    if args.url:
        url, base = args.url, None
    else:
        base = Path(args.base).resolve() if args.base else out / "comfy_base"
        server = Host(out, base, args.stand_ins)
        url = server.server.url
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the server on a plain kill too
    try:
        client = ComfyClient(url, request_timeout=args.request_timeout, retries=args.retries)
        info = client.object_info()
        try:
            methods = [ej.bind_method(label, path, opts, info) for label, path, opts in methods_specs]
        except ValueError as e:  # a node the server lacks, a binding the workflow lacks
            raise WorkflowError(str(e)) from None
        jobs = [ej.Job(m.label, ident, pi, seed) for m in methods for ident in idents
                for pi in range(len(prompts)) for seed in seeds]
        ledger = ej.Ledger(out)
        todo = [j for j in jobs if not ledger.done(j)]
        log.info("%d image job(s): %d done, %d to go", len(jobs), len(jobs) - len(todo), len(todo))
        uploaded: dict[str, list[str]] = {}
        by_label = {m.label: m for m in methods}
        t0 = time.monotonic()
        for n, job in enumerate(todo, 1):
            m = by_label[job.method]
            if job.identity not in uploaded:
                uploaded[job.identity] = [ej.upload_image(url, p, f"{job.identity}_{k}{p.suffix.lower()}",
                                                          timeout=args.request_timeout)
                                          for k, p in enumerate(idents[job.identity])]
            text = prompts[job.prompt_index].replace("{}", m.subject)
            graph = ej.fill_prompt(m, uploaded[job.identity], text, job.seed)
            apply_overrides(graph, sets)
            if args.stand_ins and base is not None:
                graph = host.use_stand_ins(graph, base)
            start = time.monotonic()
            try:
                res = client.run(graph, timeout=args.timeout)
            except TimeoutError as e:
                raise ServerError(url, f"{job.key}: {e} (--timeout {args.timeout:.0f}); rerun with the same --out "
                                  "to resume, with a larger --timeout if the server is slow") from None
            if res.status != "success":
                raise RuntimeError(f"{job.key}: ComfyUI reported an error: {json.dumps(res.error)[:1500]}")
            images = [img for nid in m.outputs for img in res.outputs.get(nid, {}).get("images", [])]
            if not images:
                raise RuntimeError(f"{job.key}: no images from output node(s) {m.outputs}")
            files = []
            for k, img in enumerate(images):
                rel = f"{job.stem()}_{k:02d}.png"
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                tmp = out / (rel + ".part")
                tmp.write_bytes(ej.fetch_image(url, img, timeout=args.request_timeout))
                os.replace(tmp, out / rel)
                files.append(rel)
            total = time.monotonic() - start
            ledger.add({"key": job.key, "method": job.method, "identity": job.identity,
                        "prompt_index": job.prompt_index, "seed": job.seed, "prompt": text, "files": files,
                        "prompt_id": res.prompt_id, "seconds_total": total,
                        "seconds_sampling": ej.exec_seconds(res.messages), "finished": time.time()})
            eta = (time.monotonic() - t0) / n * (len(todo) - n)
            log.info("[%d/%d] %s: %.2f s (about %.0f s to go)", n, len(todo), job.key, total, eta)
    finally:
        if server is not None:
            server.stop()


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
    if not prompts:
        raise SystemExit("no prompts: give --prompts FILE or a --preset")
    idents = ej.identities(Path(args.identities))
    specs = [ej.parse_method(s) for s in args.method]
    if not specs and not args.score_only:
        raise SystemExit("give at least one --method WORKFLOW")
    for _, path, _ in specs:
        load_workflow(path)  # before a server is started: WorkflowError for a file that is not one
    if not args.score_only:
        generate(args, out, specs, idents, prompts, seeds, overrides(args, preset))
    from facecond_dev import eval_score

    return eval_score.score_and_report(args, out, preset, idents, prompts, seeds, pack_py())


if __name__ == "__main__":
    print(main())
