"""What an evaluation run was: its settings read from the stored job graphs (not from the command line of a later
run), the deviations from its preset, which recogniser judged what (and whether a method was conditioned on it),
and the calibration of each recogniser on the real photos (same-person and different-person baselines)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

SAMPLERS = ("KSampler", "KSamplerAdvanced", "FacecondThreeWayCFGSampler")
SAMPLER_KEYS = ("steps", "cfg", "sampler_name", "scheduler", "denoise")


def parse_seeds(text) -> list[int]:
    """"0-7" / "1,2,3" / a list -> the seeds."""
    if isinstance(text, list):
        return [int(s) for s in text]
    out = []
    for part in str(text).split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b) + 1)) if b else [int(a)]
    return out


def _values(entries: list[dict], cls: tuple[str, ...], keys: tuple[str, ...]) -> dict[str, list]:
    out: dict[str, list] = {}
    for e in entries:
        for node in (e.get("graph") or {}).values():
            if node.get("class_type") in cls:
                for k in keys:
                    v = node["inputs"].get(k)
                    if v is not None and not isinstance(v, list) and v not in out.setdefault(k, []):
                        out[k].append(v)
    return out


def settings(entries: list[dict]) -> dict:
    """The settings the stored images were made with, per method (each a list: several values mean a mixed run)."""
    per: dict[str, dict] = {}
    for method in dict.fromkeys(e["method"] for e in entries):
        es = [e for e in entries if e["method"] == method]
        s = _values(es, SAMPLERS, SAMPLER_KEYS)
        size = _values(es, ("EmptyLatentImage",), ("width", "height"))
        groups = [(e["identity"], e["prompt"]) for e in es]
        per[method] = {
            **{k: s.get(k, []) for k in SAMPLER_KEYS},
            "size": [f"{w}x{h}" for w in size.get("width", []) for h in size.get("height", [])],
            "models": sorted({f"{n} ({(i or '')[:12]})" for e in es for n, i in (e.get("models") or {}).items()}),
            "identities": len({e["identity"] for e in es}),
            "prompts": len({e["prompt"] for e in es}),
            "seeds": sorted({e["seed"] for e in es}),
            "n_per_prompt": max(groups.count(g) for g in set(groups)),
            "images": sum(len(e["files"]) for e in es),
            "servers": sorted({e.get("server", "?") for e in es}),
        }
    return per


def deviations(preset: dict, per_method: dict, run: dict, no_face: str) -> list[str]:
    """Each way the stored images' protocol differs from the preset's (each marks 'not the paper's protocol')."""
    if not preset:
        return []
    out = []
    want = {k: v for k, v in preset.get("sampler", {}).items() if k in SAMPLER_KEYS}
    if "size" in preset:
        want["size"] = f"{preset['size']}x{preset['size']}"
    for method, s in per_method.items():
        for k, v in want.items():
            got = s.get(k, [])
            if got != [v]:
                out.append(f"{method}: {k} {', '.join(map(str, got)) or 'not set'} instead of the preset's {v}")
    n_seeds, n_prompts = len(parse_seeds(preset.get("seeds", [0]))), len(preset.get("prompts", []))
    for method, s in per_method.items():
        if s["n_per_prompt"] != n_seeds:
            out.append(f"{method}: {s['n_per_prompt']} seed(s) per prompt instead of the preset's {n_seeds}")
        if s["prompts"] != n_prompts:
            out.append(f"{method}: {s['prompts']} prompt(s) instead of the preset's {n_prompts}")
    if run.get("quick"):
        out.append("--quick (64 px, 2 steps)")
    out += [f"--set {x}" for x in run.get("set", [])]
    if preset.get("no_face") and no_face != preset["no_face"]:
        out.append(f"faceless images: {no_face} instead of the preset's {preset['no_face']}")
    return out


def file_sha256(path: str | Path) -> str | None:
    p = Path(path)
    if not p.is_file():
        return None
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def conditioned_on(entries: list[dict], judge_name: str, judge_sha: str | None) -> list[str]:
    """Methods whose workflows name the judge's model file (same sha256, or the same file name where the sha256
    is not known): judged by the network they were conditioned on."""
    hits = []
    for method in dict.fromkeys(e["method"] for e in entries):
        names = {(Path(n).name, i) for e in entries if e["method"] == method
                 for n, i in (e.get("models") or {}).items()}
        if any((judge_sha and i == judge_sha) or n == Path(judge_name).name for n, i in names):
            hits.append(method)
    return hits


def calibration(refs: dict[str, torch.Tensor], mode: str) -> dict[str, dict]:
    """Per person, from the real photos' embeddings: same-person (each photo against the person's other photos)
    and different-person (each photo against every other person's photos) identity scores, reduced as the
    generated images are (``mode``): mean and min of the first, mean and max of the second."""
    from facecond.py.evaluate.metrics import reference_cosines

    out = {}
    for name, e in refs.items():
        row: dict[str, float | int] = {"photos": int(e.shape[0])}
        if e.shape[0] > 1:
            same = torch.cat([reference_cosines(e[i:i + 1], torch.cat([e[:i], e[i + 1:]]), mode)
                              for i in range(e.shape[0])])
            row["same_mean"], row["same_min"] = float(same.mean()), float(same.min())
        others = [reference_cosines(e, o, mode) for n, o in refs.items() if n != name]
        if others:
            diff = torch.cat(others)
            row["diff_mean"], row["diff_max"] = float(diff.mean()), float(diff.max())
        out[name] = row
    return out
