"""Train a Celeb Basis coefficient MLP from the command line (Yuan et al. 2023; same code as TrainCelebBasis).

ComfyUI is imported in-process (the pinned host by default, or --comfyui PATH); the checkpoint is any SD1.x,
SD2.x or SDXL file; photos are read from a folder, their faces detected and embedded with the pack's face nodes, then
the trainer the node runs (``nodes/celebbasis.train_celeb_mlp``) writes the same file
(models/facecond/celebbasis/<save-name>.safetensors under the ComfyUI base directory, or --base-dir). Prints the
written file's path. Example:

    .host/venv/bin/python -P scripts/train_celebbasis.py --checkpoint sd15.safetensors --photos me/ --steps 400

This file also holds the helpers scripts/train_face_ti.py uses (ComfyUI import, photo loading, face embedding).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")

log = logging.getLogger("facecond")


def common_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--checkpoint", required=True, help="SD1.x, SD2.x or SDXL checkpoint file (.safetensors/.ckpt)")
    ap.add_argument("--photos", help="folder of photos of the person (one face each)")
    ap.add_argument("--comfyui", default=None,
                    help="ComfyUI folder (default: the pinned host that FACECOND_HOST names, see host.py)")
    ap.add_argument("--base-dir", help="ComfyUI base directory for models/ (default: the ComfyUI folder's)")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU")
    ap.add_argument("--detector", default="mtcnn", help="face detector, as FaceDetectCrop's 'detector'")
    ap.add_argument("--embedder", default="facenet_vggface2", help="face recogniser, as FaceEmbed's 'model'")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=0.005)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-augment", action="store_true", help="no colour jitter / resize / shift")
    ap.add_argument("--templates", help="text file of prompt templates, one per line with {} (default: the node's)")
    ap.add_argument("--resolution", type=int, default=0,
                    help="side (px) the face crops are taken and trained at; 0: the model's native size (SD1.x: 512)")
    ap.add_argument("--names", help="celebrity-name list, a text file with one name a line (default: the pack's list)")


def import_comfy(comfyui: str | None, base_dir: str | None, cpu: bool):
    """Import ComfyUI (``host.import_comfy``) and the pack in-process; returns the pack."""
    sys.path.insert(0, str(REPO / "scripts"))
    from facecond_dev import host

    try:
        host.import_comfy(Path(base_dir).resolve() if base_dir else None, comfyui, cpu=cpu)
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None
    return host.load_pack(REPO, "facecond")


def load_checkpoint(path: str):
    import comfy.sd
    import folder_paths

    if not Path(path).is_file():
        raise SystemExit(f"--checkpoint {path}: no such file")
    out = comfy.sd.load_checkpoint_guess_config(path, output_vae=True, output_clip=True,
                                                embedding_directory=folder_paths.get_folder_paths("embeddings"))
    return out[:3]


def load_photos(folder: str):
    """[(file name, (1, H, W, 3) float tensor)] of the folder's photos, sorted by name."""
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in PHOTO_SUFFIXES) \
        if folder and Path(folder).is_dir() else []
    if not files:
        raise SystemExit(f"--photos {folder}: no photos ({', '.join(PHOTO_SUFFIXES)}) found")
    out = []
    for p in files:
        img = ImageOps.exif_transpose(Image.open(p)).convert("RGB")
        out.append((p.name, torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]))
    return out


def scaled_affine(m, size: int, base: int = 160):
    """An image->crop matrix for a ``base`` px crop, made for the same crop at ``size`` px (pixel centres kept:
    u' + 0.5 = s (u + 0.5))."""
    import numpy as np

    s = size / base
    out = np.asarray(m, np.float64) * s
    out[:, 2] += 0.5 * (s - 1.0)
    return out


def faces_of(photos, detector: str, embedder: str, size: int = 160):
    """(crops (N, size, size, 3), FaceEmbeds (N, D)): the largest face of each photo, through the pack's nodes;
    the crop is FaceDetectCrop's FaceNet margin crop, taken again from the photo at ``size`` px (not upscaled
    from its 160 px crop)."""
    import numpy as np
    import torch

    from facecond.nodes.faces.detect_embed import FacecondFaceDetectCrop, FacecondFaceEmbed
    from facecond.py.faces.align import warp_crop
    from facecond.py.faces.types import FaceEmbeds

    crops, rows, model_id, normalized = [], [], None, True
    for name, img in photos:
        faces = FacecondFaceDetectCrop().detect(img, detector=detector, select="largest", face_index=0, min_size=40,
                                                margin_scale=1.0, upright="rotate_if_no_face", no_face="error")[0]
        fe = FacecondFaceEmbed().embed(faces, embedder, "bottleneck_512", "auto")[0]
        if size == faces.crops_facenet.shape[1]:
            crops.append(faces.crops_facenet[:1])
        else:
            m = scaled_affine(faces.affine_facenet[0].numpy(), size, faces.crops_facenet.shape[1])
            crop = warp_crop(img[0].numpy().astype(np.float32), m, size)
            crops.append(torch.from_numpy(np.clip(crop, 0.0, 1.0))[None].float())
        rows.append(fe.embeds[:1])
        model_id, normalized = fe.model, fe.normalized
        log.info("[facecond] %s: face found", name)
    embeds = torch.cat(rows)
    return torch.cat(crops), FaceEmbeds(embeds, model_id, normalized, tuple(range(len(rows))))


def names_arg(path: str | None):
    """The --names list (None: the pack's list); a bad file ends the run with the reason."""
    if not path:
        return None
    from facecond.py.celebbasis import basis as cb

    try:
        return cb.load_names(path)
    except ValueError as e:
        raise SystemExit(f"--names: {e}") from None


def crop_size(model, resolution: int) -> int:
    from facecond.nodes.celebbasis.training import native_resolution

    return int(resolution) if resolution else native_resolution(model)


def templates_text(path: str | None, default: str) -> str:
    return Path(path).read_text(encoding="utf-8") if path else default


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_args(ap)
    ap.add_argument("--identities", default="", help="one label per photo in name order ('a,a,b'); empty: one person")
    ap.add_argument("--p", type=int, default=512, help="basis size (capped at names - 1)")
    ap.add_argument("--save-name", default="celeb_mlp", help="file name in models/facecond/celebbasis")
    ap.add_argument("--resume", action="store_true", help="continue save-name's run from its last saved step")
    ap.add_argument("--overwrite", action="store_true", help="replace save-name's files (default: a new numbered name "
                    "if they exist)")
    ap.add_argument("--checkpoint-every", type=int, default=50, help="save the run every N steps (0: only at the end)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import_comfy(args.comfyui, args.base_dir, args.cpu)
    import folder_paths

    from facecond.nodes.celebbasis.basis import DEFAULT_TEMPLATES, FOLDER, train_celeb_mlp
    from facecond.nodes.common import Progress
    from facecond.py.celebbasis.train import WordTrainConfig

    names = names_arg(args.names)
    model, clip, vae = load_checkpoint(args.checkpoint)
    size = crop_size(model, args.resolution)
    crops, embeds = faces_of(load_photos(args.photos), args.detector, args.embedder, size)
    config = WordTrainConfig(steps=args.steps, lr=args.lr, seed=args.seed, augment=not args.no_augment)
    _, name, report = train_celeb_mlp(model, clip, vae, crops, embeds, identities=args.identities,
                                      prompt_templates=templates_text(args.templates, DEFAULT_TEMPLATES), p=args.p,
                                      config=config, save_name=args.save_name, resume=args.resume,
                                      overwrite=args.overwrite, checkpoint_every=args.checkpoint_every,
                                      on_step=Progress(args.steps, label="TrainCelebBasis"), names=names,
                                      resolution=size)
    log.info("[facecond] %s", report)
    path = str(Path(folder_paths.get_folder_paths(FOLDER)[0]) / name)
    print(path)
    return path


if __name__ == "__main__":
    main()
