"""Screenshot example workflows as the ComfyUI front end draws them (the README's pictures).

A docs tool, run by hand; not part of the tests and not a project dependency. It needs Debian's Chromium
and the Python ``playwright`` package (its driver only: never ``playwright install``) in any Python 3.10+;
the server itself runs on the pinned host's Python (``make demo`` / ``scripts/setup_host.sh``):

    apt-get install -y chromium                      # /usr/bin/chromium
    python3 -m venv /tmp/shotvenv && /tmp/shotvenv/bin/pip install playwright pillow
    /tmp/shotvenv/bin/python scripts/screenshot_workflow.py --run 'faces_*' \
        example_workflows/face0_single_photo.json example_workflows/faces_detect_embed_similarity.json

Each workflow becomes ``docs/images/<workflow-name>.png`` (about 60-120 KB). The script lays out a throw-away
base directory (``host.prepare_base``: the pack linked in, an empty placeholder under the example checkpoint
name so the loader's list is not empty, the insightface test pack and the sample face photos from
../shared/data as the LoadImage files), starts ComfyUI with only the pack enabled (``host.ComfyServer``),
opens the front end in headless Chromium, loads each workflow with the front end's own
``app.loadGraphData``, fits the graph into the window and saves the page. With ``--run GLOB`` the matching
workflows are first queued from the page (as the Run button does), so their preview nodes show real
outputs; use it only for graphs that run on the stand-ins (the faces one), not for Face0 (its tiny random
checkpoint draws noise). It fails, printing the server log, if a node type is not registered in the front
end (the pack did not load), and warns about nodes saved smaller than their widgets or overlapping.
Pillow, if installed, re-encodes the PNG with a 256-colour palette (a third of the size).

The layout check alone, for every example of a host's range, without pictures: ``facecond_dev/layout_check.py``
(``--fix`` rewrites them; the opt-in test ``tests/workflows/test_example_layout.py`` runs it).

Options: ``--size 1600x900`` (the window), ``--scale 1`` (device pixel ratio), ``--max-zoom 1.3``,
``--chrome`` keeps the front end's menus and side bar (default: canvas only), ``--out DIR``.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/: facecond_dev (stdlib-only here)
from facecond_dev import host

log = logging.getLogger("facecond.screenshot")
CHROMIUM = "/usr/bin/chromium"
SAMPLE_FACES = ("obama/obama.jpg", "obama/obama2.jpg")  # in ../shared/data/faces (as the tests use them)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--hide-scrollbars", "--font-render-hinting=none"]
# Front-end settings for a quiet first start: no tutorial / template browser, no minimap, full-detail
# drawing at any zoom (LOD off), classic canvas nodes.
SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Minimap.Visible": False,
    "LiteGraph.Canvas.MinFontSizeForLOD": 1,
    "Comfy.VueNodes.Enabled": False,
    "Comfy.Graph.CanvasInfo": False,
    "Comfy.Validation.Workflows": True,
    "Comfy.Workflow.ShowMissingModelsWarning": False,
    "Comfy.Workflow.ShowMissingNodesWarning": True,
}
# Hides the front end's floating chrome so the canvas fills the picture (with --chrome it stays).
HIDE_CHROME_CSS = """
.comfyui-body-top, .comfyui-body-left, .comfyui-body-right, .comfyui-body-bottom,
.side-tool-bar-container, .graph-canvas-menu, .p-toast, .selection-toolbox, .actionbar,
.comfyui-menu, .workflow-tabs-container, .comfyui-queue-button, .splitter-overlay > *:not(.graph-canvas-panel),
[class*="bottom-panel"], [class*="zoom-controls"], .minimap-main-container { display: none !important; }
"""

_LOAD_JS = """
async ([wf, name]) => {
  const app = window.app;
  await app.loadGraphData(wf, true, true, name,
                          {showMissingNodesDialog: false, showMissingModelsDialog: false});
  const LG = window.LiteGraph;
  const missing = wf.nodes.map(n => n.type).filter(t => !(LG.registered_node_types || {})[t]);
  const errored = app.graph.nodes.filter(n => n.has_errors).map(n => n.type);
  return {missing: [...new Set(missing)], errored, count: app.graph.nodes.length};
}
"""

# Queue the loaded graph from the page (as the Run button does) and wait for the end, so that preview and
# save nodes show their images in the picture.
_RUN_JS = """
async (timeoutMs) => {
  const api = window.comfyAPI.api.api;
  const done = new Promise((resolve) => {
    api.addEventListener("execution_success", () => resolve({ok: true}));
    api.addEventListener("execution_error", (e) => resolve({ok: false, detail: e.detail}));
  });
  await window.app.queuePrompt(0, 1);
  const timeout = new Promise((resolve) => setTimeout(() => resolve({ok: false, detail: "timeout"}), timeoutMs));
  return await Promise.race([done, timeout]);
}
"""

# Layout check, once the front end has laid the nodes out: nodes saved smaller than their widgets (the
# front end grows them on load) and nodes (title bar included) that overlap.
_CHECK_JS = """
(wf) => {
  const app = window.app, saved = Object.fromEntries(wf.nodes.map(n => [String(n.id), n.size]));
  const small = [], overlaps = [];
  for (const n of app.graph.nodes) {
    const min = n.computeSize ? n.computeSize() : n.size, old = saved[String(n.id)];
    if (old && (old[0] + 0.5 < min[0] || old[1] + 0.5 < min[1]))
      small.push(`#${n.id} ${n.type} saved size [${old.map(Math.round)}] < content [${min.map(Math.ceil)}]`);
  }
  const ns = app.graph.nodes, R = (n) => n.boundingRect;
  for (let i = 0; i < ns.length; i++) for (let j = i + 1; j < ns.length; j++) {
    const a = R(ns[i]), b = R(ns[j]);
    const ox = Math.min(a[0] + a[2], b[0] + b[2]) - Math.max(a[0], b[0]);
    const oy = Math.min(a[1] + a[3], b[1] + b[3]) - Math.max(a[1], b[1]);
    const name = (n) => `#${n.id} ${n.type}`;
    if (ox > 2 && oy > 2) overlaps.push(`${name(ns[i])} / ${name(ns[j])} (${Math.round(ox)}x${Math.round(oy)} px)`);
  }
  return {small, overlaps};
}
"""

# Fit every node (title bar included) and group into the canvas less the insets [left, top, right, bottom]
# (CSS px); zoom capped at max_zoom.
_FIT_JS = """
([inset, maxZoom]) => {
  const app = window.app, c = app.canvas, ds = c.ds;
  let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
  const add = (r) => { x0 = Math.min(x0, r[0]); y0 = Math.min(y0, r[1]);
                       x1 = Math.max(x1, r[0] + r[2]); y1 = Math.max(y1, r[1] + r[3]); };
  for (const n of app.graph.nodes) add(n.boundingRect);
  for (const g of (app.graph.groups || app.graph._groups || [])) add(g._bounding || g.bounding);
  const dpr = window.devicePixelRatio || 1;
  const w = c.canvas.width / dpr, h = c.canvas.height / dpr;
  const aw = w - inset[0] - inset[2], ah = h - inset[1] - inset[3];
  const scale = Math.min(aw / (x1 - x0), ah / (y1 - y0), maxZoom);
  ds.scale = scale;
  ds.offset[0] = (inset[0] + (aw - (x1 - x0) * scale) / 2) / scale - x0;
  ds.offset[1] = (inset[1] + (ah - (y1 - y0) * scale) / 2) / scale - y0;
  c.setDirty(true, true);
  c.draw(true, true);
  return {scale, bounds: [x0, y0, x1 - x0, y1 - y0], canvas: [w, h]};
}
"""


# The size each node is drawn at once loaded: what it was saved with, grown to fit its widgets/previews.
_SIZES_JS = """() => Object.fromEntries(app.graph._nodes.map(n => {
    const c = n.computeSize ? n.computeSize() : n.size;
    return [n.id, [Math.max(n.size[0], c[0]), Math.max(n.size[1], c[1])]];
}))"""
TITLE_GAP = 60  # free space above a node: its title bar (30 px) and the source badge


def fix_layout(workflow: dict, drawn: dict[str, list[float]]) -> bool:
    """Give every node the size it is drawn at, then remove overlaps: nodes keep their column (same x) and
    order, columns move right and nodes move down only as far as needed. Returns whether anything changed."""
    nodes = workflow["nodes"]
    before = json.dumps([[n["pos"], n["size"]] for n in nodes])
    for n in nodes:
        w, h = drawn.get(str(n["id"]), n["size"])
        n["size"] = [round(max(n["size"][0], w)), round(max(n["size"][1], h))]
    columns: dict[float, list[dict]] = {}
    for n in nodes:
        columns.setdefault(n["pos"][0], []).append(n)
    right = None
    for x in sorted(columns):
        col = sorted(columns[x], key=lambda n: n["pos"][1])
        new_x = x if right is None else max(x, right + 40)
        bottom = None
        for n in col:
            n["pos"] = [new_x, n["pos"][1] if bottom is None else max(n["pos"][1], bottom + TITLE_GAP)]
            bottom = n["pos"][1] + n["size"][1]
        right = max(new_x + n["size"][0] for n in col)
    return json.dumps([[n["pos"], n["size"]] for n in nodes]) != before


def _prepare(base: Path, workflows: list[Path], photos: list[Path]) -> None:
    host.prepare_base(base, host.REPO, "facecond", tiny_checkpoint=False)
    ckpt = base / "models" / "checkpoints" / host.EXAMPLE_CKPT
    if not ckpt.exists():
        ckpt.write_bytes(b"")  # only listed in the loader's combo: a graph that loads it cannot be --run
    data = host.shared_data()
    pack = base / "models" / "insightface" / "models" / getattr(host, "TEST_PACK", "testpack")
    if data is not None and (data / "models" / "insightface_testpack").is_dir() and not pack.exists():
        pack.parent.mkdir(parents=True, exist_ok=True)  # the small insightface test pack, for --run
        pack.symlink_to(data / "models" / "insightface_testpack", target_is_directory=True)
    if photos:  # each workflow's LoadImage files, in name order, get the photos in turn
        files: dict[str, Path] = {}
        for wf in workflows:
            for i, name in enumerate(sorted(host.workflow_input_images(wf))):
                files.setdefault(name, photos[i % len(photos)])
        host.copy_inputs(base, files)
    settings = base / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps(SETTINGS, indent=1))


def _optimise(png: Path, colors: int) -> None:
    try:
        from PIL import Image
    except ImportError:
        log.warning("Pillow not installed: %s left as Chromium wrote it", png)
        return
    before = png.stat().st_size
    img = Image.open(png).convert("RGB")
    img.quantize(colors=colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
        png, optimize=True)
    log.info("%s: %d KB -> %d KB", png.name, before // 1024, png.stat().st_size // 1024)


def screenshot(url: str, workflows: list[Path], out_dir: Path, *, size: tuple[int, int], scale: float,
               max_zoom: float, margin: int, chrome: bool, colors: int, settle_ms: int,
               run: tuple[str, ...] = (), run_timeout: float = 600, fix: bool = False) -> list[Path]:
    from playwright.sync_api import sync_playwright

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    profile = Path(tempfile.mkdtemp(prefix="facecond-chromium-"))
    try:
        with sync_playwright() as pw:
            ctx = pw.chromium.launch_persistent_context(
                str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
                viewport={"width": size[0], "height": size[1]}, device_scale_factor=scale,
                color_scheme="dark")
            # the "Introducing Nodes 2.0" banner remembers its dismissal in localStorage
            ctx.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")
            page = ctx.pages[0] if ctx.pages else ctx.new_page()
            page.on("console", lambda m: m.type == "error" and log.debug("console: %s", m.text))
            page.on("pageerror", lambda e: log.warning("page error: %s", e))
            for wf_path in workflows:
                page.goto(url, wait_until="networkidle")
                page.wait_for_function("window.app && window.app.graph && window.app.canvas && "
                                       "window.LiteGraph && Object.keys(window.LiteGraph.registered_node_types)"
                                       ".length > 100", timeout=120_000)
                if not chrome:
                    page.add_style_tag(content=HIDE_CHROME_CSS)
                    page.wait_for_timeout(300)
                    page.evaluate("() => window.dispatchEvent(new Event('resize'))")
                workflow = json.loads(wf_path.read_text())
                info = page.evaluate(_LOAD_JS, [workflow, wf_path.stem])
                if fix:
                    page.wait_for_timeout(settle_ms)  # image previews grow LoadImage nodes
                    if fix_layout(workflow, page.evaluate(_SIZES_JS)):
                        wf_path.write_text(json.dumps(workflow, indent=1, ensure_ascii=False) + "\n")
                        log.info("%s: layout fixed (sizes as drawn, no overlaps); reloading", wf_path.name)
                        info = page.evaluate(_LOAD_JS, [workflow, wf_path.stem])
                if info["missing"]:
                    raise RuntimeError(f"{wf_path.name}: node types not registered in the front end "
                                       f"(the pack did not load?): {info['missing']}")
                if any(fnmatch.fnmatch(wf_path.name, g) for g in run):
                    result = page.evaluate(_RUN_JS, run_timeout * 1000)
                    if not result["ok"]:
                        raise RuntimeError(f"{wf_path.name}: the run failed: {json.dumps(result['detail'])[:2000]}")
                    log.info("%s: ran; outputs shown on the canvas", wf_path.name)
                page.wait_for_timeout(settle_ms)  # images (LoadImage previews), fonts, DOM widgets
                layout = page.evaluate(_CHECK_JS, workflow)
                for line in layout["small"]:
                    log.warning("%s: node smaller than its widgets: %s", wf_path.name, line)
                for line in layout["overlaps"]:
                    log.warning("%s: nodes overlap: %s", wf_path.name, line)
                if info["errored"]:
                    log.warning("%s: nodes drawn with errors: %s", wf_path.name, info["errored"])
                # with the menus shown, keep the graph clear of the side bar, the tabs and the zoom controls
                inset = [margin + 60, margin + 60, margin, margin + 40] if chrome else [margin] * 4
                fit = page.evaluate(_FIT_JS, [inset, max_zoom])
                page.wait_for_timeout(500)
                page.mouse.move(size[0] - 1, size[1] - 1)  # no hover highlight or tooltip
                log.info("%s: %d nodes, zoom %.2f", wf_path.name, info["count"], fit["scale"])
                png = out_dir / f"{wf_path.stem}.png"
                page.screenshot(path=str(png))
                if colors:
                    _optimise(png, colors)
                written.append(png)
            ctx.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    return written


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workflows", nargs="+", help="UI-format workflow JSON files")
    ap.add_argument("--out", default=str(host.REPO / "docs" / "images"), help="folder for the PNGs")
    ap.add_argument("--size", default="1600x900", help="window size WxH in CSS pixels")
    ap.add_argument("--scale", type=float, default=1.0, help="device pixel ratio")
    ap.add_argument("--max-zoom", type=float, default=1.3, help="largest canvas zoom when fitting")
    ap.add_argument("--margin", type=int, default=24, help="free pixels around the graph")
    ap.add_argument("--chrome", action="store_true", help="keep the front end's menus and side bar")
    ap.add_argument("--colors", type=int, default=256, help="palette size of the saved PNG (0: keep RGB)")
    ap.add_argument("--settle-ms", type=int, default=2500, help="wait after loading, before fitting")
    ap.add_argument("--run", action="append", default=[], metavar="GLOB",
                    help="queue the workflows whose file name matches GLOB (repeatable) from the page first, so "
                         "their preview nodes show images; only for workflows that run on the stand-in weights "
                         "(the faces one: MTCNN from facenet-pytorch, the insightface test pack)")
    ap.add_argument("--python", default=str(host.HOST_DIR / "venv" / "bin" / "python"),
                    help="Python of the ComfyUI host")
    ap.add_argument("--comfyui", default=None, help="ComfyUI folder (default: the pinned host)")
    ap.add_argument("--image", action="append", default=[],
                    help="photo for the workflows' LoadImage nodes (repeat: one per file name, in turn)")
    ap.add_argument("--keep-base", action="store_true", help="keep the throw-away base dir (server log)")
    ap.add_argument("--fix-layout", action="store_true",
                    help="rewrite each workflow's node sizes/positions so nothing overlaps (then screenshot it)")
    args = ap.parse_args(argv)

    workflows = [Path(w).resolve() for w in args.workflows]
    width, height = (int(v) for v in args.size.lower().split("x"))
    photos = [Path(p) for p in args.image]
    if not photos and host.shared_data() is not None:
        faces = host.shared_data() / "faces"
        photos = [faces / name for name in SAMPLE_FACES]
    base = Path(tempfile.mkdtemp(prefix="facecond-shot-"))
    _prepare(base, workflows, [p for p in photos if p.is_file()])
    ok = False
    try:
        with host.ComfyServer(base, comfy_root=args.comfyui, python=args.python) as srv:
            try:
                pngs = screenshot(srv.url, workflows, Path(args.out), size=(width, height), scale=args.scale,
                                  max_zoom=args.max_zoom, margin=args.margin, chrome=args.chrome,
                                  colors=args.colors, settle_ms=args.settle_ms, run=args.run,
                                  fix=args.fix_layout)
            except Exception:
                log.error("server log (%s):\n%s", srv.log_path, srv.log_tail())
                raise
        ok = True
    finally:
        if args.keep_base or not ok:
            log.info("base dir kept: %s", base)
        else:
            shutil.rmtree(base, ignore_errors=True)
    for png in pngs:
        print(png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
