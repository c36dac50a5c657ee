"""The evaluation CLI's outputs: per-image CSV/JSON, the per-method summary, matplotlib plots and an HTML report
(table with the papers' published numbers beside, best-of-N vs mean, an image grid per identity)."""

from __future__ import annotations

import csv
import html
import json
import math
from pathlib import Path

COLUMNS = ("method", "identity", "prompt_index", "prompt", "seed", "image", "file", "has_face", "id",
           "id_independent", "clip", "aggregate", "seconds_total", "seconds_sampling", "job")


def _num(v) -> float:
    return float("nan") if v is None or v == "" else float(v)


def summarise(rows: list[dict], best_of_n) -> dict[str, dict]:
    """Per method: image count, faceless count, and mean / best-of-N (over each identity x prompt's seeds) of the
    identity, CLIP and aggregate scores."""
    out: dict[str, dict] = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == method]
        groups = [(r["identity"], r["prompt_index"]) for r in rs]
        s = {"images": len(rs), "faceless": sum(1 for r in rs if not r["has_face"]),
             "seeds_per_prompt": max(groups.count(g) for g in set(groups))}
        for metric in ("id", "id_independent", "clip", "aggregate"):
            b = best_of_n([_num(r[metric]) for r in rs], groups)
            s[f"{metric}_mean"], s[f"{metric}_best"] = b.mean, b.best
        t = [_num(r["seconds_total"]) for r in rs]
        e = [_num(r["seconds_sampling"]) for r in rs if r["seconds_sampling"] is not None]
        s["seconds_per_image"] = sum(t) / len(t) if t else float("nan")
        s["sampling_seconds_per_image"] = sum(e) / len(e) if e else float("nan")
        out[method] = s
    return out


def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    return x


def write_tables(out: Path, rows: list[dict], summary: dict, meta: dict) -> None:
    with open(out / "images.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if isinstance(r[k], float) and math.isnan(r[k]) else r[k]) for k in COLUMNS})
    (out / "images.json").write_text(json.dumps(_json_safe(rows), indent=1))
    (out / "summary.json").write_text(json.dumps(_json_safe({"meta": meta, "methods": summary}), indent=1))


def plot(out: Path, rows: list[dict], summary: dict, aggregate: str) -> Path:
    """plots.png: identity vs CLIP per image (one colour per method) and mean / best-of-N aggregate bars."""
    try:
        import matplotlib
    except ImportError as e:
        raise RuntimeError("the report's plots need matplotlib: pip install matplotlib (or 'facecond[eval]')") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=80)
    for method in summary:
        pts = [(_num(r["clip"]), _num(r["id"])) for r in rows if r["method"] == method]
        pts = [p for p in pts if not (math.isnan(p[0]) or math.isnan(p[1]))]
        a.scatter([p[0] for p in pts], [p[1] for p in pts], s=18, alpha=0.75, label=method)
    a.set_xlabel("CLIP image-text cosine")
    a.set_ylabel("identity cosine")
    a.set_title("per image")
    a.legend(fontsize=8)
    names = list(summary)
    x = range(len(names))
    b.bar([i - 0.2 for i in x], [summary[m]["aggregate_mean"] for m in names], 0.4, label="mean")
    b.bar([i + 0.2 for i in x], [summary[m]["aggregate_best"] for m in names], 0.4, label="best of N")
    b.set_xticks(list(x), names, rotation=15, fontsize=8)
    b.set_title(f"aggregate ({aggregate})")
    b.legend(fontsize=8)
    fig.tight_layout()
    path = out / "plots.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def _fmt(v, digits: int = 4) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


_CSS = ("body{font-family:sans-serif;margin:16px;color:#222}table{border-collapse:collapse;margin:8px 0}"
        "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:right}th{background:#f0f0f0}"
        "td.l,th.l{text-align:left}img.t{width:72px;height:72px;image-rendering:pixelated}.pub{color:#666}")


def _protocol_html(meta: dict) -> list[str]:
    """What was run, read from the stored images' graphs: settings per method, flags, deviations from the preset."""
    e = html.escape
    run = meta.get("run", {})
    h = ["<h2>Protocol</h2><table><tr><th class=l>method</th><th>images</th><th>identities</th><th>prompts</th>"
         "<th>seeds (N of best-of-N)</th><th>steps</th><th>cfg</th><th>sampler</th><th>scheduler</th><th>size</th>"
         "<th class=l>model files (sha256)</th><th class=l>servers</th></tr>"]
    for m, s in meta.get("settings", {}).items():
        j = lambda k, s=s: ", ".join(map(str, s.get(k, []))) or "–"  # noqa: E731
        h.append(f"<tr><td class=l>{e(m)}</td><td>{s['images']}</td><td>{s['identities']}</td><td>{s['prompts']}</td>"
                 f"<td>{len(s['seeds'])} ({s['n_per_prompt']})</td><td>{e(j('steps'))}</td><td>{e(j('cfg'))}</td>"
                 f"<td>{e(j('sampler_name'))}</td><td>{e(j('scheduler'))}</td><td>{e(j('size'))}</td>"
                 f"<td class=l>{e('; '.join(s['models']))}</td><td class=l>{e(', '.join(s['servers']))}</td></tr>")
    h.append("</table>")
    flags = [f"--quick: {bool(run.get('quick'))}", f"--set: {', '.join(run.get('set', [])) or 'none'}",
             f"stand-in face models: {bool(run.get('stand_ins'))}",
             f"jobs scored: {meta.get('jobs_scored')} of {meta.get('jobs_planned')} planned",
             f"faceless images: {meta['no_face']} ({NO_FACE_TEXT.get(meta['no_face'], '')})",
             f"reference photos combined by: {meta['reference_mode']}", f"detector: {meta['detector']}",
             f"CLIP: {meta.get('clip_model')} with the person as {meta.get('clip_subject')!r}"]
    h.append("<p>" + " · ".join(e(f) for f in flags) + "</p>")
    dev = meta.get("deviations") or []
    if meta.get("preset") and dev:
        h.append(f"<p><b>Not the paper's protocol</b> ({e(meta['preset'])} preset): " + "; ".join(e(d) for d in dev)
                 + "</p>")
    elif meta.get("preset"):
        h.append(f"<p>Settings as the {e(meta['preset'])} preset asks.</p>")
    return h


NO_FACE_TEXT = {"zero": "identity 0, counted in every mean", "flag": "left out of the ID and aggregate means, CLIP "
                "still counts them", "passthrough": "the centre square scored as the face"}


def _judges_html(meta: dict) -> list[str]:
    e = html.escape
    h = ["<h2>Recognisers and calibration</h2><p>The identity score of real photos: same person = each photo "
         "against the person's other photos, different person = against everyone else's (reduced by "
         f"{e(meta['reference_mode'])} as the generated images are). A method's ID reads against these.</p>"]
    for j in meta.get("judges", []):
        warn = (f" <b>⚠ conditioned on this recogniser: {e(', '.join(j['conditioned']))}</b> (judged by the network "
                "it was conditioned on; read the independent column)") if j["conditioned"] else ""
        h.append(f"<h3>{e(j['role'])}: <code>{e(j['model_id'])}</code>, preprocessing {e(j['preprocess'])}{warn}</h3>"
                 "<table><tr><th class=l>person</th><th>photos</th><th>same-person mean</th><th>same-person min</th>"
                 "<th>different-person mean</th><th>different-person max</th></tr>")
        for person, c in j["calibration"].items():
            h.append(f"<tr><td class=l>{e(person)}</td><td>{c['photos']}</td>" + "".join(
                f"<td>{_fmt(c.get(k))}</td>" for k in ("same_mean", "same_min", "diff_mean", "diff_max")) + "</tr>")
        h.append("</table>")
    return h


def write_html(out: Path, rows: list[dict], summary: dict, meta: dict, fidelity: dict) -> Path:
    agg = meta["aggregate"]
    e = html.escape
    judges = meta.get("judges", [])
    names = {j["role"]: j for j in judges}
    cond = names.get("conditioning", {}).get("conditioned", [])
    indep = names.get("independent")
    settings = meta.get("settings", {})
    n_per = sorted({s["n_per_prompt"] for s in settings.values()})
    title = meta.get("preset") or "custom protocol"
    if meta.get("preset") and meta.get("deviations"):
        title += " settings, not the paper's protocol"
    h = [f"<!doctype html><meta charset=utf-8><title>facecond evaluation</title><style>{_CSS}</style>",
         f"<h1>Identity evaluation: {e(title)}</h1>",
         f"<p>{len(rows)} images · {len(meta['identities'])} identities · {len(meta['prompts'])} prompts · "
         f"seeds {e(str(meta['seeds']))} (best of {e(', '.join(map(str, n_per)))}) · recogniser "
         f"<code>{e(meta['recogniser'])}</code>" + (f" and independent <code>{e(indep['name'])}</code>" if indep
                                                    else "") + f" · CLIP <code>{e(str(meta.get('clip_model')))}</code>"
         f" · aggregate <b>{e(agg)}</b> · faceless: {e(meta['no_face'])}</p>",
         "<h2>Methods</h2><table><tr><th class=l>method</th><th>images</th><th>faceless</th><th>ID mean</th>"
         "<th>ID best</th>" + ("<th>ID independent mean</th><th>ID independent best</th>" if indep else "")
         + "<th>CLIP mean</th><th>CLIP best</th><th>aggregate mean</th><th>aggregate best-of-N</th>"
         "<th>FID</th><th>IS (marginal)</th><th>IS (uniform p(y))</th><th>s/image</th></tr>"]
    for m, s in summary.items():
        f = fidelity.get(m, {})
        keys = ("id_mean", "id_best") + (("id_independent_mean", "id_independent_best") if indep else ()) + (
            "clip_mean", "clip_best", "aggregate_mean", "aggregate_best")
        flag = " ⚠" if m in cond else ""
        h.append(f"<tr><td class=l>{e(m)}{flag}</td><td>{s['images']}</td><td>{s['faceless']}</td>"
                 + "".join(f"<td>{_fmt(s[k])}</td>" for k in keys)
                 + f"<td>{_fmt(f.get('fid'), 2)}</td><td>{_fmt(f.get('is_marginal'), 2)}</td>"
                 f"<td>{_fmt(f.get('is_uniform'), 2)}</td><td>{_fmt(s['seconds_per_image'], 2)}</td></tr>")
    h.append("</table>")
    if cond:
        h.append(f"<p>⚠ {e(', '.join(cond))}: conditioned on the ID column's recogniser, so that column flatters it; "
                 "the independent column is the fair comparison.</p>")
    h += _judges_html(meta) + _protocol_html(meta)
    pub = meta.get("published") or []
    if pub:
        cols = list(dict.fromkeys(k for p in pub for k in p.get("values", {})))
        h.append(f"<h3 class=pub>Published ({e(meta.get('paper', ''))})</h3><table class=pub><tr><th class=l>"
                 "method</th>" + "".join(f"<th>{e(c)}</th>" for c in cols) + "</tr>")
        for p in pub:
            h.append(f"<tr><td class=l>{e(p['method'])}</td>"
                     + "".join(f"<td>{e(str(p['values'].get(c, '–')))}</td>" for c in cols) + "</tr>")
        h.append("</table>")
        if meta.get("published_note"):
            h.append(f"<p class=pub>{e(meta['published_note'])}</p>")
    h.append("<h2>Plots</h2><img src=plots.png alt=plots>")
    h.append("<h2>Images</h2><p>One row per method and prompt, one column per seed; the number under each image "
             "is its identity cosine (– no face).</p>")
    seeds = list(dict.fromkeys(r["seed"] for r in rows))
    for ident in dict.fromkeys(r["identity"] for r in rows):
        h.append(f"<h3>{e(ident)}</h3><table><tr><th class=l>method</th><th class=l>prompt</th>"
                 + "".join(f"<th>seed {s}</th>" for s in seeds) + "</tr>")
        keys = dict.fromkeys((r["method"], r["prompt_index"]) for r in rows if r["identity"] == ident)
        for method, pi in keys:
            cell = {r["seed"]: r for r in rows if (r["identity"], r["method"], r["prompt_index"], r["image"])
                    == (ident, method, pi, 0)}
            prompt = next(iter(cell.values()))["prompt"] if cell else ""
            h.append(f"<tr><td class=l>{e(method)}</td><td class=l>{e(prompt)}</td>" + "".join(
                f"<td><img class=t src='{e(cell[s]['file'])}'><br>{_fmt(_num(cell[s]['id']), 3)}</td>"
                if s in cell else "<td></td>" for s in seeds) + "</tr>")
        h.append("</table>")
    path = out / "report.html"
    path.write_text("\n".join(h))
    return path
