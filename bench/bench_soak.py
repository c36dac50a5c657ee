"""Benchmark (soak): N prompts that detect, embed and sample through a headless ComfyUI server, then "free memory".

The Face0 single-photo example (FaceDetectCrop with MTCNN -> FaceEmbed with the test pack's ONNX recogniser ->
ProjectToContext -> ThreeWayCFGSampler on the tiny checkpoint, 64x64, 1 step; the photo scaled to 320 px). Each
prompt changes margin_scale and the seed a little, so detection, embedding and sampling run every time (no
ComfyUI output-cache hits).
Prints the server's RSS after prompt 10 and after prompt N and their ratio (target <= 1.05), then POSTs /free
{"unload_models": true, "free_memory": true} and counts the pack's resident models from GET /facecond/models
(target 0). No asserts: numbers for the report.
    .host/venv/bin/python -P bench/bench_soak.py [--prompts 100]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
log = logging.getLogger("bench_soak")


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def resident(client) -> list[dict]:
    return client._request("/facecond/models")["models"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=100)
    ap.add_argument("--early", type=int, default=10, help="the prompt whose RSS is the baseline")
    ap.add_argument("--steps", type=int, default=1, help="sampling steps per prompt")
    ap.add_argument("--photo", type=int, default=320, help="width the input photo is scaled to (pixels)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import tempfile

    from facecond_dev import host
    from facecond_dev.client import ComfyClient

    data = host.shared_data()
    if data is None:
        raise SystemExit("bench_soak needs ../shared/data (test photos and the insightface test pack)")
    host.import_comfy(None)  # the tiny checkpoint and the stand-in projection are built with ComfyUI's classes
    base = host.prepare_base(Path(tempfile.mkdtemp(prefix="facecond-soak-")), ROOT, "facecond")
    host.install_stand_in_models(base)
    from PIL import Image

    im = Image.open(data / "faces/obama/obama.jpg").convert("RGB")
    im.resize((args.photo, round(im.height * args.photo / im.width))).save(base / "input/face0_photo.jpg")
    workflow = host.example_workflow("face0_single_photo.json")
    with host.ComfyServer(base, pack_name="facecond") as srv:
        client = ComfyClient(srv.url, base)
        prompt = host.quick_prompt(workflow, client.object_info(), base,
                                   {"FacecondThreeWayCFGSampler": {"steps": args.steps}})
        det = next(k for k, n in prompt.items() if n["class_type"] == "FacecondFaceDetectCrop")
        sampler = next(k for k, n in prompt.items() if n["class_type"] == "FacecondThreeWayCFGSampler")
        rss = {}
        t0 = time.monotonic()
        for i in range(1, args.prompts + 1):
            prompt[det]["inputs"]["margin_scale"] = round(1.0 + 0.001 * i, 3)  # new crops: detect/embed rerun
            prompt[sampler]["inputs"]["seed"] = i
            result = client.run(prompt)
            if result.error:
                raise SystemExit(f"prompt {i} failed: {result.error}")
            rss[i] = rss_mib(srv.proc.pid)
            if i in (1, args.early) or i % 25 == 0:
                log.info("prompt %3d: server RSS %.1f MiB, pack models %d", i, rss[i], len(resident(client)))
        elapsed = time.monotonic() - t0
        before = resident(client)
        urllib.request.urlopen(urllib.request.Request(
            srv.url + "/free", data=b'{"unload_models": true, "free_memory": true}',
            headers={"Content-Type": "application/json"}), timeout=30).read()
        deadline = time.monotonic() + 30
        after = resident(client)
        while after and time.monotonic() < deadline:  # the worker applies the flags between prompts
            time.sleep(0.5)
            after = resident(client)
        time.sleep(1.0)
        rss_free = rss_mib(srv.proc.pid)
    n, e = args.prompts, args.early
    print(f"soak: {n} prompts (detect + embed + sample) in {elapsed:.0f} s")
    print(f"server RSS after prompt {e}: {rss[e]:.1f} MiB; after prompt {n}: {rss[n]:.1f} MiB; "
          f"ratio {rss[n] / rss[e]:.3f} (target <= 1.05); after /free: {rss_free:.1f} MiB")
    listed = ", ".join(f"{m['kind']}@{m['device']}" for m in before)
    print(f"pack models resident before /free: {len(before)} ({listed}); after /free: {len(after)} (target 0)")


if __name__ == "__main__":
    main()
