"""Benchmark: FaceDetectCrop + FaceEmbed (our nodes) vs calling facenet-pytorch / onnxruntime directly.

Same photos, same process, same models. Prints per-image time of both paths and their ratio (target <= 1.10),
then batched throughput of the nodes for 1, 8 and 32 images. No asserts: numbers for the report.
Times are the least process CPU time (facecond_dev.bench), one torch thread by default; ``--device cuda``: our
nodes and facenet-pytorch's MTCNN on the GPU (onnxruntime with CUDA when it has it), synchronised wall time, peak
VRAM. Without ../shared/data (photos, the insightface test pack) only our nodes are timed, on synthetic 250x250
images (MTCNN over the whole pyramid; where it finds no face the crop is the passed-through image) with a FaceNet of
random weights: the cost of detect + embed per image, with no ratio.
    .host/venv/bin/python -P bench/bench_faces.py [--repeats 3] [--device cpu|cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
log = logging.getLogger("bench_faces")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: stable on a shared 2-core box)")
    from facecond_dev import host
    from facecond_dev.bench import PeakMemory, Report, add_device_flags, best_time, setup

    add_device_flags(ap)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dev = args.device
    base, _ = setup(args.threads, load_checkpoint=False, device=dev)
    report = Report("faces", dev)
    data = host.shared_data()
    if data is None:
        synthetic(base, args, report)
        return
    host.install_stand_in_models(base)
    pack = base / "models/insightface/models" / host.TEST_PACK

    import facenet_pytorch
    import onnxruntime as ort
    from facenet_pytorch.models.utils.detect_face import detect_face
    from PIL import Image

    from facecond.nodes.faces.detect_embed import FacecondFaceDetectCrop, FacecondFaceEmbed
    from facecond.py.faces.align import arcface_affine, warp_crop

    photos = sorted((data / "faces/johns").glob("*/*.jpg"))[:32]
    imgs = torch.from_numpy(np.stack([np.asarray(Image.open(p).convert("RGB"), np.float32) / 255 for p in photos]))
    det_node, emb_node = FacecondFaceDetectCrop(), FacecondFaceEmbed()
    kw = {"detector": "mtcnn", "select": "largest", "face_index": 0, "min_size": 40, "margin_scale": 1.0,
          "upright": "off", "no_face": "error"}
    rec = host.STAND_IN_RECOGNISER

    def ours(batch):
        with torch.inference_mode():
            faces = det_node.detect(batch, **kw)[0]
            return emb_node.embed(faces, model=rec, facenet_layer="bottleneck_512", normalize="auto")[0]

    mt = facenet_pytorch.MTCNN(min_face_size=40, device=dev)
    providers = ["CPUExecutionProvider"]
    if dev == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    sess = ort.InferenceSession(str(pack / "mobilefacenet_128.onnx"), providers=providers)

    @torch.no_grad()
    def direct(batch):
        out = []
        for img in batch.numpy() * 255:  # the plain per-image loop a user would write
            boxes, points = detect_face(torch.from_numpy(img)[None], 40, mt.pnet, mt.rnet, mt.onet,
                                        mt.thresholds, mt.factor, dev)
            b = np.asarray(boxes[0], np.float32)
            k = int(((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).argmax())
            crop = warp_crop(img / 255, arcface_affine(np.asarray(points[0], np.float32)[k]), 112)
            blob = ((crop * 255 - 127.5) / 127.5).transpose(2, 0, 1)[None].astype(np.float32)
            out.append(sess.run(None, {"input": blob})[0])
        return np.concatenate(out)

    def timed(fn, batch):
        fn(batch)  # warm-up (model loads, caches)
        return best_time(lambda: fn(batch), args.repeats, dev)

    n = 8
    with PeakMemory(dev) as mem:
        t_ours = timed(ours, imgs[:n]) / n
    t_direct = timed(direct, imgs[:n]) / n
    report.add("direct (facenet-pytorch + onnxruntime)", t_direct, unit="image")
    report.add("ours: FaceDetectCrop + FaceEmbed", t_ours, unit="image", ratio=t_ours / t_direct, target=1.10,
               peak_mb=mem.mb)
    log.info("per image (150x150 chips, MTCNN + aligned crop + MobileFaceNet-128, best of %d):", args.repeats)
    log.info("  ours %.1f ms, direct %.1f ms, ratio %.2f (target <= 1.10)", 1e3 * t_ours, 1e3 * t_direct,
             t_ours / t_direct)
    log.info("  (faces that fill a chip cross its border: ours re-detects those zero-padded to fix MTCNN's 15-20 px "
             "landmark skew, a second MTCNN pass the direct path does not make; see MTCNN.detect)")
    big = torch.from_numpy(np.asarray(Image.open(data / "faces/obama/obama.jpg").convert("RGB"), np.float32) / 255)
    t_o, t_d = timed(ours, big[None]), timed(direct, big[None])
    log.info("  910x1137 photo: ours %.1f ms, direct %.1f ms, ratio %.2f", 1e3 * t_o, 1e3 * t_d, t_o / t_d)
    for b in (1, 8, 32):
        t = timed(ours, imgs[:b])
        log.info("batch %2d: %.1f ms total, %.1f images/s", b, 1e3 * t, b / t)
        report.add(f"ours, batch {b}", t / b, unit="image")
    report.write(args.json, repeats=args.repeats, photos="shared/data")


def synthetic(base, args, report) -> None:
    """Our nodes alone on synthetic images, a FaceNet of random weights (no ../shared/data here)."""
    from facenet_pytorch.models.inception_resnet_v1 import InceptionResnetV1
    from safetensors.torch import save_file

    from facecond.nodes.faces.detect_embed import FacecondFaceDetectCrop, FacecondFaceEmbed
    from facecond_dev.bench import PeakMemory, best_time

    torch.manual_seed(0)
    net = InceptionResnetV1(pretrained=None, classify=False)
    (base / "models" / "facenet").mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()},
              str(base / "models" / "facenet" / "bench_random.safetensors"))
    # smooth random images (a blurred noise field): MTCNN runs its whole pyramid on them
    imgs = torch.nn.functional.avg_pool2d(torch.rand(8, 3, 250, 250), 9, 1, 4).permute(0, 2, 3, 1).contiguous()
    kw = {"detector": "mtcnn", "select": "largest", "face_index": 0, "min_size": 40, "margin_scale": 1.0,
          "upright": "off", "no_face": "passthrough"}

    def ours(batch):
        with torch.inference_mode():
            faces = FacecondFaceDetectCrop().detect(batch, **kw)[0]
            return FacecondFaceEmbed().embed(faces, model="facenet/bench_random.safetensors",
                                             facenet_layer="bottleneck_512", normalize="auto")[0]

    ours(imgs[:1])  # warm-up (model loads)
    for b in (1, 8):
        with PeakMemory(args.device) as mem:
            t = best_time(lambda b=b: ours(imgs[:b]), args.repeats, args.device)
        log.info("synthetic 250x250, batch %d: %.1f ms per image (detect + crop + FaceNet embed)", b, 1e3 * t / b)
        report.add(f"ours (synthetic 250x250, random FaceNet), batch {b}", t / b, unit="image", peak_mb=mem.mb)
    report.write(args.json, repeats=args.repeats, photos="synthetic")


if __name__ == "__main__":
    main()
