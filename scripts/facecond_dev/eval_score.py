"""Scoring for the evaluation CLI: every image in runs.jsonl gets its identity cosine (the pack's face code),
its CLIP score and the paper aggregate; FID/IS per method on request. Then the tables, plots and report."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import eval_report
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


def score_rows(args, out: Path, idents: dict, prompts: list[str], py) -> tuple[list[dict], dict]:
    from facecond.py.evaluate import clip_score, identity, metrics

    entries = sorted(Ledger(out).entries.values(),
                     key=lambda e: (e["method"], e["identity"], e["prompt_index"], e["seed"]))
    det, rec = face_models(py, args.detector, args.recogniser)
    clip = clip_score.load_clip_scorer(args.clip_model, args.device) if args.clip_model else None
    agg = args.aggregate
    refs = {i: identity.reference_embeds([load_rgb(p) for p in ps], det, rec) for i, ps in idents.items()}
    rows, timing = [], {"identity": 0.0, "clip": 0.0}
    for e in entries:
        if e["identity"] not in refs:
            continue
        imgs = [load_rgb(out / f) for f in e["files"]]
        t = time.monotonic()
        shapes = {a.shape for a in imgs}
        ids = [identity.score_images(a[None], refs[e["identity"]], det, rec, no_face=args.no_face,
                                     mode=args.reference_mode) for a in imgs] if len(shapes) > 1 else \
            [identity.score_images(np.stack(imgs), refs[e["identity"]], det, rec, no_face=args.no_face,
                                   mode=args.reference_mode)]
        id_vals = [s for r in ids for s in r.scores]
        has = [f for r in ids for f in r.has_face]
        timing["identity"] += time.monotonic() - t
        text = prompts[e["prompt_index"]].replace("{}", args.clip_subject)
        t = time.monotonic()
        clip_vals = [float(clip.cosines(torch.from_numpy(a[None]), [text])[0]) for a in imgs] if clip else \
            [float("nan")] * len(imgs)
        timing["clip"] += time.monotonic() - t
        for k, f in enumerate(e["files"]):
            rows.append({"method": e["method"], "identity": e["identity"], "prompt_index": e["prompt_index"],
                         "prompt": text, "seed": e["seed"], "image": k, "file": f, "has_face": bool(has[k]),
                         "id": id_vals[k], "clip": clip_vals[k],
                         "aggregate": metrics.aggregate(agg, clip_vals[k], id_vals[k]) if clip else float("nan"),
                         "seconds_total": e["seconds_total"], "seconds_sampling": e.get("seconds_sampling")})
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


def score_and_report(args, out: Path, preset: dict, idents: dict, prompts: list[str], seeds: list[int], py) -> Path:
    from facecond.py.evaluate.metrics import best_of_n

    args.aggregate = args.aggregate or preset.get("aggregate", "livshits")
    args.inception_score = args.inception_score or bool(preset.get("inception_score"))
    rows, timing = score_rows(args, out, idents, prompts, py)
    if not rows:
        raise SystemExit(f"{out}: no generated images to score yet")
    summary = eval_report.summarise(rows, best_of_n)
    fid = fidelity_scores(args, out, rows)
    for m, vals in fid.items():
        summary[m].update(vals)
    meta = {"preset": preset.get("name"), "paper": preset.get("paper", ""), "aggregate": args.aggregate,
            "published": preset.get("published", []), "published_note": preset.get("published_note", ""),
            "identities": sorted(idents), "prompts": prompts, "seeds": seeds,
            "recogniser": Path(args.recogniser).name, "detector": args.detector, "no_face": args.no_face,
            "reference_mode": args.reference_mode,
            "clip_model": Path(args.clip_model).name if args.clip_model else None, "timing": timing}
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
