"""Scoring for the evaluation CLI: every image in runs.jsonl gets its identity cosine (the pack's face code),
its CLIP score and the paper aggregate; FID/IS per method on request. Then the tables, plots and report."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import eval_protocol, eval_report
from .eval_jobs import Ledger

log = logging.getLogger("facecond.evaluate")


def load_rgb(path) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1]."""
    return np.asarray(Image.open(path).convert("RGB"), np.float32) / 255.0


def face_models(py, detector: str, recogniser: str | None):
    """(detector, recogniser) objects of the pack's face code: MTCNN with the weights facenet-pytorch ships, or an
    SCRFD file; an insightface-format ONNX recogniser, or a FaceNet state dict."""
    from facecond.py.faces import detect
    from facecond.py.faces import onnx_pack as ifp
    from facecond.py.weights import manifest

    if detector == "mtcnn":
        det = detect.MTCNN(*(manifest.package_file(manifest.get_entry(f"mtcnn_{n}")) for n in ("pnet", "rnet",
                                                                                              "onet")))
    else:
        det = detect.SCRFD(ifp.make_session(Path(detector)), name=f"scrfd:{Path(detector).name}")
    return det, load_recogniser(recogniser)


def load_recogniser(recogniser: str | None):
    """An insightface-format .onnx, a FaceNet .pt, or ``dlib`` (dlib's ResNet from face-recognition-models)."""
    from facecond.py.faces import dlib_rec, embed

    if not recogniser:
        raise SystemExit("give --recogniser: an insightface-format .onnx (e.g. antelopev2/glintr100.onnx), the "
                         f"FaceNet VGGFace2 .pt, or {dlib_rec.MODEL_NAME} (dlib's ResNet)")
    if recogniser in ("dlib", dlib_rec.MODEL_NAME):
        try:
            return dlib_rec.DlibRecogniser()
        except dlib_rec.DlibMissing as e:
            raise SystemExit(f"--recogniser {recogniser}: {e}") from None
    return embed.load_onnx_recogniser(recogniser) if recogniser.endswith(".onnx") else embed.load_facenet(recogniser)


@dataclass
class Judge:
    """One recogniser scoring the images: its detector, preprocessing and the identities' reference embeddings."""

    role: str          # "conditioning" (--recogniser) or "independent" (--independent-recogniser)
    name: str          # as given
    rec: object
    det: object
    preprocess: str
    sha256: str | None
    refs: dict = field(default_factory=dict)

    @property
    def model_id(self) -> str:
        from facecond.py.evaluate import identity

        return identity.recogniser_id(self.rec)


def preprocess_for(recogniser: str, choice: str) -> str:
    """auto: insightface's FaceAnalysis exactly for an insightface-format .onnx recogniser, the pack's otherwise."""
    if choice != "auto":
        return choice
    return "insightface" if str(recogniser).endswith(".onnx") else "facecond"


def judges(args, idents: dict, py) -> list[Judge]:
    from facecond.py.evaluate import identity

    out = []
    for role, name in (("conditioning", args.recogniser), ("independent", args.independent_recogniser)):
        if not name or name == "none":
            continue
        det, rec = face_models(py, args.detector, name)
        pre = preprocess_for(name, args.preprocess)
        j = Judge(role, name, rec, det, pre, eval_protocol.file_sha256(name))
        j.refs = {i: identity.reference_embeds([load_rgb(p) for p in ps], det, rec, preprocess=pre)
                  for i, ps in idents.items()}
        out.append(j)
    return out


def stored_entries(out: Path, run: dict) -> list[dict]:
    """The finished jobs of the run in run.json (all of runs.jsonl for a folder without one)."""
    ledger = Ledger(out).entries
    ids = run.get("jobs")
    entries = [ledger[j] for j in ids if j in ledger] if ids else list(ledger.values())
    return sorted(entries, key=lambda e: (e["method"], e["identity"], e["prompt_index"], e["seed"]))


def score_rows(args, out: Path, entries: list[dict], js: list[Judge]) -> tuple[list[dict], dict]:
    from facecond.py.evaluate import clip_score, identity, metrics

    clip = clip_score.load_clip_scorer(args.clip_model, args.device) if args.clip_model else None
    agg = args.aggregate
    rows, timing = [], {"identity": 0.0, "clip": 0.0}
    for e in entries:
        if any(e["identity"] not in j.refs for j in js):
            continue
        imgs = [load_rgb(out / f) for f in e["files"]]
        t = time.monotonic()
        per_judge = []
        for j in js:
            kw = {"no_face": args.no_face, "mode": args.reference_mode, "preprocess": j.preprocess}
            res = [identity.score_images(a[None], j.refs[e["identity"]], j.det, j.rec, **kw) for a in imgs]
            per_judge.append(([s for r in res for s in r.scores], [f for r in res for f in r.has_face]))
        timing["identity"] += time.monotonic() - t
        # the CLIP text: the stored prompt template with --clip-subject for the person (the stored text itself for
        # a ledger written before templates were stored)
        text = e["prompt_template"].replace("{}", args.clip_subject) if e.get("prompt_template") else e["prompt"]
        t = time.monotonic()
        clip_vals = [float(clip.cosines(torch.from_numpy(a[None]), [text])[0]) for a in imgs] if clip else \
            [float("nan")] * len(imgs)
        timing["clip"] += time.monotonic() - t
        for k, f in enumerate(e["files"]):
            id_vals, has = per_judge[0]
            row = {"method": e["method"], "identity": e["identity"], "prompt_index": e["prompt_index"],
                   "prompt": text, "seed": e["seed"], "image": k, "file": f, "has_face": bool(has[k]),
                   "id": id_vals[k], "id_independent": per_judge[1][0][k] if len(js) > 1 else float("nan"),
                   "clip": clip_vals[k],
                   "aggregate": metrics.aggregate(agg, clip_vals[k], id_vals[k]) if clip else float("nan"),
                   "seconds_total": e["seconds_total"], "seconds_sampling": e.get("seconds_sampling"),
                   "job": e["job"]}
            rows.append(row)
    n = max(len(rows), 1)
    timing = {f"{k}_seconds_per_image": v / n for k, v in timing.items()}
    return rows, timing


def fidelity_scores(args, out: Path, rows: list[dict]) -> dict[str, dict]:
    """FID against --fid-real and/or IS (both priors) per method, with torch-fidelity's Inception."""
    if not (args.fid_real or args.inception_score):
        return {}
    from facecond.py.evaluate import fidelity

    net = fidelity.load_inception(args.inception_weights, args.device)

    def feats(paths):
        arrs = [torch.from_numpy(load_rgb(p)) for p in paths]
        return fidelity.inception_features(net, torch.stack(arrs)) if len({a.shape for a in arrs}) == 1 else \
            tuple(np.concatenate(x) if isinstance(x[0], np.ndarray) else torch.cat(x) for x in
                  zip(*(fidelity.inception_features(net, a[None]) for a in arrs)))

    real = None
    if args.fid_real:
        files = sorted(p for p in Path(args.fid_real).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        real = feats(files)[0]
    res = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        f, logits = feats([out / r["file"] for r in rows if r["method"] == method])
        res[method] = fidelity.inception_scores(logits) if args.inception_score else {}
        if real is not None:
            res[method]["fid"] = fidelity.fid(real, f)
    return res


def score_and_report(args, out: Path, preset: dict, idents: dict, run: dict, py) -> Path:
    from facecond.py.evaluate.metrics import best_of_n

    args.aggregate = args.aggregate or preset.get("aggregate", "livshits")
    args.inception_score = args.inception_score or bool(preset.get("inception_score"))
    entries = stored_entries(out, run)
    if not entries:
        raise SystemExit(f"{out}: no generated images to score yet")
    js = judges(args, idents, py)
    rows, timing = score_rows(args, out, entries, js)
    if not rows:
        raise SystemExit(f"{out}: no generated images of the given --identities to score")
    summary = eval_report.summarise(rows, best_of_n)
    fid = fidelity_scores(args, out, rows)
    for m, vals in fid.items():
        summary[m].update(vals)
    per_method = eval_protocol.settings(entries)
    meta = {"preset": preset.get("name"), "paper": preset.get("paper", ""), "aggregate": args.aggregate,
            "published": preset.get("published", []), "published_note": preset.get("published_note", ""),
            "identities": sorted({e["identity"] for e in entries}),
            "prompts": list(dict.fromkeys(r["prompt"] for r in rows)),
            "seeds": sorted({e["seed"] for e in entries}),
            "jobs_planned": len(run.get("jobs", [])) or len(entries), "jobs_scored": len(entries),
            "recogniser": Path(args.recogniser).name, "detector": args.detector, "no_face": args.no_face,
            "reference_mode": args.reference_mode,
            "judges": [{"role": j.role, "name": Path(j.name).name, "model_id": j.model_id, "preprocess": j.preprocess,
                        "conditioned": eval_protocol.conditioned_on(entries, j.name, j.sha256),
                        "calibration": eval_protocol.calibration(j.refs, args.reference_mode)} for j in js],
            "settings": per_method, "run": {k: v for k, v in run.items() if k != "jobs"},
            "deviations": eval_protocol.deviations(preset, per_method, run, args.no_face),
            "clip_model": Path(args.clip_model).name if args.clip_model else None, "clip_subject": args.clip_subject,
            "timing": timing}
    eval_report.write_tables(out, rows, summary, meta)
    eval_report.plot(out, rows, summary, args.aggregate)
    path = eval_report.write_html(out, rows, summary, meta, fid)
    for m, s in summary.items():
        log.info("%s: ID %.4f (best %.4f), CLIP %.4f, %s %.4f (best of %d %.4f), %d faceless of %d", m,
                 s["id_mean"], s["id_best"], s["clip_mean"], args.aggregate, s["aggregate_mean"],
                 s["seeds_per_prompt"], s["aggregate_best"], s["faceless"], s["images"])
    if any(math.isnan(s["id_mean"]) for s in summary.values()):
        log.warning("some method has no image with a face: its identity score is empty")
    return path
