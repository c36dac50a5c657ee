"""Prepare Face0 training data (Valevski et al. 2023): images + captions → WebDataset shards with face embeddings.

Sources (any mix, enumerated in a fixed order so every machine agrees): a folder of images with KEY.txt
captions next to them, a CSV (or Parquet, needs pyarrow) with columns path,caption, or WebDataset .tar shards
holding KEY.jpg/png + KEY.txt. Each image: MTCNN (facenet-pytorch weights), largest face of at least
--min-face px, Face0's crop margins, embedded with --face-model (a FaceNet VGGFace2 state dict: Face0's
embedder, or an insightface-format ONNX recogniser); the image is stored at --resolution (short side, centre
crop; default: the --checkpoint's native size, SDXL 1024), with its original size and crop corner (SDXL's
micro-conditioning), optionally with its VAE latent (--checkpoint, a ComfyUI SD checkpoint).
Format: py/train/face0_data.py
(sources: py/train/face0_sources.py).

Resumable: a shard counts as finished when its report ``shard-NNNNNN.json`` exists; re-running skips it.
Parallel: --workers processes on this machine; --shard-index i --num-shards n splits the shards across
machines (every n-th shard, same sources and --shard-size on every machine). Bad inputs (unreadable or corrupt
images, no face, missing caption) are skipped and counted in report.json, never fatal.

    .host/venv/bin/python -P scripts/face0_prepare.py SOURCE [SOURCE ...] --out DIR \\
        --face-model models/facenet/20180402-114759-vggface2.pt --checkpoint sd_xl_base_1.0.safetensors \\
        --shard-size 1000 --workers 8
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from facecond_dev import host

log = logging.getLogger("facecond.face0_prepare")
_STATE: dict = {}  # per worker process: the face model, the VAE encoder, the pack


def _pack():
    if "pack" not in _STATE:
        # a spawned worker inherits the parent's sys.path, where ComfyUI's nodes.py has put comfy/ (whose
        # utils.py would shadow ComfyUI's utils package): drop it before importing ComfyUI afresh
        sys.path[:] = [p for p in sys.path if not (Path(p).name == "comfy" and (Path(p) / "utils.py").is_file())]
        host.import_comfy(Path(tempfile.mkdtemp(prefix="facecond-prep-")))
        _STATE["pack"] = host.load_pack(host.REPO, "facecond")
    return _STATE["pack"]


def build_face_model(face_model: str, normalize: str, device: str = "cpu"):
    """MTCNN (weights shipped in facenet-pytorch, via the manifest) + the chosen recogniser."""
    _pack()
    from facecond.py.faces import detect, embed
    from facecond.py.train.face0_data import FaceModel
    from facecond.py.weights import manifest as weights

    paths = []
    for net in ("pnet", "rnet", "onet"):
        p = weights.package_file(weights.get_entry(f"mtcnn_{net}"))
        if p is None:
            raise RuntimeError("face0_prepare: MTCNN weights not found; pip install facenet-pytorch")
        paths.append(p)
    det = detect.MTCNN(*paths, device=device)
    if not os.path.isfile(face_model):
        raise FileNotFoundError(f"face0_prepare: --face-model {face_model} does not exist")
    if face_model.lower().endswith(".onnx"):
        rec = embed.load_onnx_recogniser(face_model)
        fn, model_id, default_norm = (lambda faces: rec.embed(faces.crops_arcface)), rec.model_id, True
    else:  # FaceNet Inception-ResNet-V1 state dict: Face0's embedder, the layer before the L2 norm
        net = embed.load_facenet(face_model)
        fn, model_id, default_norm = (lambda faces: net.embed(faces.crops_facenet)), net.model_id("bottleneck_512"), \
            False
    norm = default_norm if normalize == "auto" else normalize == "l2"
    out = (lambda faces: embed.l2_normalize(fn(faces))) if norm else fn
    return FaceModel(det, out, model_id, norm)


def build_latent_encoder(checkpoint: str):
    """(B, R, R, 3) in [0, 1] -> (B, 4, R/8, R/8) with the checkpoint's VAE (ComfyUI's loader, VAE only)."""
    _pack()
    import comfy.sd
    import torch

    vae = comfy.sd.load_checkpoint_guess_config(checkpoint, output_vae=True, output_clip=False,
                                                output_model=False)[2]
    if vae is None:
        raise RuntimeError(f"face0_prepare: {checkpoint} holds no VAE; latents need one")

    def encode(images):
        with torch.inference_mode():
            return vae.encode(images).float().cpu().clone()

    return encode


def _init_worker(args: dict) -> None:
    logging.basicConfig(level=logging.WARNING)
    _STATE["face"] = build_face_model(args["face_model"], args["normalize"], args["device"])
    _STATE["latents"] = build_latent_encoder(args["checkpoint"]) if args["checkpoint"] else None


def _run_shard(job: tuple) -> dict:
    from facecond.py.train.face0_data import PrepConfig, prepare_shard

    items, first, path, cfg = job
    rep = prepare_shard(items, first, path, _STATE["face"], PrepConfig(**cfg), _STATE["latents"])
    return rep.to_json()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sources", nargs="+", help="folders, .csv, .parquet or .tar shards")
    ap.add_argument("--out", required=True, help="output folder for shard-NNNNNN.tar, their reports, report.json")
    ap.add_argument("--face-model", required=True, help="FaceNet state dict (.pt/.safetensors) or ONNX recogniser")
    ap.add_argument("--normalize", choices=("auto", "l2", "none"), default="auto",
                    help="auto: FaceNet raw (as Face0), insightface L2-normalised (as FaceEmbed)")
    ap.add_argument("--checkpoint", help="ComfyUI SD checkpoint whose VAE precomputes latents (optional)")
    ap.add_argument("--resolution", type=int, default=0,
                    help="stored image side (multiple of 8); 0: the --checkpoint's native size (SD1.x and SD2-base "
                    "512, SD2-v 768, SDXL 1024), 512 without one")
    ap.add_argument("--min-face", type=int, default=20, help="smallest face kept, px of the original (Face0: 20)")
    ap.add_argument("--detect-max-side", type=int, default=1024, help="detect on images downscaled to this")
    ap.add_argument("--shard-size", type=int, default=1000, help="input items per shard")
    ap.add_argument("--workers", type=int, default=1, help="processes on this machine")
    ap.add_argument("--shard-index", type=int, default=0, help="this machine's index, 0..num-shards-1")
    ap.add_argument("--num-shards", type=int, default=1, help="machines splitting the shards")
    ap.add_argument("--device", default="cpu", help="device for MTCNN")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.resolution % 8 or args.resolution < 0:
        ap.error(f"--resolution {args.resolution} must be 0 (the checkpoint's native size) or a multiple of 8")
    _pack()
    if not args.resolution:
        from facecond.nodes.model_family import checkpoint_native_resolution

        args.resolution = checkpoint_native_resolution(args.checkpoint) if args.checkpoint else 512
        log.info("--resolution %d (%s)", args.resolution, "the checkpoint's native size" if args.checkpoint else
                 "no --checkpoint: SD1.5's size")
    from facecond.py.train import face0_data as fd
    from facecond.py.train.face0_sources import source_items

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    items = source_items(args.sources)
    plan = fd.plan_shards(len(items), args.shard_size)
    mine = fd.my_shards(len(plan), args.shard_index, args.num_shards)
    todo = [i for i in mine if not (out / f"{fd.shard_name(i)[:-4]}.json").is_file()]
    log.info("%d items, %d shards; this machine: %d shards, %d already finished", len(items), len(plan), len(mine),
             len(mine) - len(todo))
    cfg = {"resolution": args.resolution, "min_face": args.min_face, "detect_max_side": args.detect_max_side}
    jobs = [(items[plan[i].start:plan[i].stop], plan[i].start, str(out / fd.shard_name(i)), cfg) for i in todo]
    wargs = {"face_model": args.face_model, "normalize": args.normalize, "checkpoint": args.checkpoint,
             "device": args.device}
    t0 = time.perf_counter()
    if args.workers <= 1:
        _init_worker(wargs)
        reports = [_run_shard(j) for j in jobs]
    else:
        with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn"), initializer=_init_worker,
                                 initargs=(wargs,)) as ex:
            reports = list(ex.map(_run_shard, jobs))
    for r in reports:
        log.info("shard %d: %d written, skipped %s", r["shard"], r["written"], r["skipped"])
    summary = fd.summarize(out, len(items), len(plan))
    summary["this_run"] = {"shards": len(jobs), "seconds": round(time.perf_counter() - t0, 2),
                           "images": sum(r["written"] + sum(r["skipped"].values()) for r in reports)}
    (out / "report.json").write_text(json.dumps(summary, indent=1))
    print(out / "report.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
