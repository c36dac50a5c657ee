"""Train a face textual-inversion embedding from the command line (Livshits 2023; same code as TrainFaceTI).

ComfyUI is imported in-process (the pinned host by default, or --comfyui PATH); photos come from a folder, their
faces are detected and embedded with the pack's face nodes, and the trainer the node runs
(``nodes/inversion.train_face_ti``) writes the same file:
models/embeddings/<name>.safetensors (use it as embedding:<name>). Prints the written file's path. Examples:

    .host/venv/bin/python -P scripts/train_face_ti.py --checkpoint sd15.safetensors --photos me/ --name me_ti
    .host/venv/bin/python -P scripts/train_face_ti.py --checkpoint sd15.safetensors --precompute-celeb-faces

--precompute-celeb-faces makes the cache init=id needs: one generated portrait per celebrity name of the pack's
list (about 630 images: ~10-20 minutes at 512 px / 20 steps on a modern GPU, hours on a CPU), embedded with
--embedder and cached per model in models/facecond/celebbasis.

--init id --celeb-photos DIR compares the person with real celebrity photos instead (the paper's way): one
sub-folder of DIR per celebrity, named after them ("Tom Hanks" or "Tom_Hanks"). --celeb-filter T additionally
drops names whose portrait, as this model draws it (the --precompute-celeb-faces cache), has face cosine below T
with their photos.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # python -P does not put the script's folder on the path
from train_celebbasis import (
    common_args,
    crop_size,
    faces_of,
    import_comfy,
    load_checkpoint,
    load_photos,
    names_arg,
    templates_text,
)

log = logging.getLogger("facecond")


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_args(ap)
    ap.add_argument("--name", default="face_ti_person", help="embedding name (the word after embedding:)")
    ap.add_argument("--init", default="face", choices=("face", "rand2", "id"))
    ap.add_argument("--num-vectors", type=int, default=2)
    ap.add_argument("--reparam", default="log_norm_e", choices=("none", "log_norm_2", "log_norm_e"))
    ap.add_argument("--precompute-celeb-faces", action="store_true",
                    help="only build the celebrity-face cache for --init id (see above), then exit")
    ap.add_argument("--precompute-steps", type=int, default=20)
    ap.add_argument("--precompute-size", type=int, default=0,
                    help="side (px) of the generated celebrity portraits; 0: the model's native size")
    ap.add_argument("--max-names", type=int, default=0, help="precompute for the first N names only (0: all)")
    ap.add_argument("--celeb-photos", help="--init id: folder with one sub-folder of photos per celebrity")
    ap.add_argument("--celeb-filter", type=float, default=None,
                    help="--celeb-photos: drop names whose generated portrait (the precomputed cache) has face cosine "
                         "below this with their photos")
    ap.add_argument("--resume", action="store_true", help="continue --name's run from its last saved step")
    ap.add_argument("--overwrite", action="store_true", help="replace --name's files (default: a new numbered name "
                    "if they exist)")
    ap.add_argument("--checkpoint-every", type=int, default=50, help="save the run every N steps (0: only at the end)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import_comfy(args.comfyui, args.base_dir, args.cpu)

    from facecond.nodes.celebbasis.basis import DEFAULT_TEMPLATES
    from facecond.nodes.celebbasis.inversion import precompute_celeb_faces, train_face_ti
    from facecond.nodes.common import Progress
    from facecond.py.celebbasis import basis as cb
    from facecond.py.celebbasis.train import WordTrainConfig

    names = names_arg(args.names)
    model, clip, vae = load_checkpoint(args.checkpoint)
    if args.precompute_celeb_faces:
        names = names or cb.load_names()
        names = names[:args.max_names] if args.max_names > 0 else names
        path, _ = precompute_celeb_faces(model, clip, vae, names, args.detector, args.embedder,
                                         steps=args.precompute_steps, size=args.precompute_size, seed=args.seed)
        print(path)
        return path
    size = crop_size(model, args.resolution)
    crops, embeds = faces_of(load_photos(args.photos), args.detector, args.embedder, size)
    celeb = celeb_photos(args, model, clip, embeds.model) if args.celeb_photos else None
    config = WordTrainConfig(steps=args.steps, lr=args.lr, seed=args.seed, augment=not args.no_augment)
    path, _, losses, what = train_face_ti(
        model, clip, vae, crops, embeds, init=args.init, num_vectors=args.num_vectors, reparam=args.reparam,
        prompt_templates=templates_text(args.templates, DEFAULT_TEMPLATES), config=config, save_name=args.name,
        progress=Progress(args.steps, label="TrainFaceTI"), names=names, resolution=size, celeb_faces=celeb,
        resume=args.resume, overwrite=args.overwrite, checkpoint_every=args.checkpoint_every)
    if losses:
        log.info("[facecond] %d steps, init %s, loss first %.4f last %.4f", len(losses), what, losses[0], losses[-1])
    print(path)
    return path


def celeb_photos(args, model, clip, embedder_id: str):
    """CelebFaces of --celeb-photos (and the --celeb-filter against this model's precomputed portraits)."""
    from facecond.nodes.celebbasis.celeb_photos import embed_photo_folder
    from facecond.nodes.celebbasis.inversion import celeb_faces_path
    from facecond.py.celebbasis import inversion as inv

    if not Path(args.celeb_photos).is_dir():
        raise SystemExit(f"--celeb-photos {args.celeb_photos}: no such folder")
    faces, report = embed_photo_folder(str(Path(args.celeb_photos).resolve()), args.detector, args.embedder,
                                       "train_face_ti")
    log.info("[facecond] %s", report)
    if args.celeb_filter is not None:
        cache = celeb_faces_path(model, clip, embedder_id, "train_face_ti")
        if not Path(cache).is_file():
            raise SystemExit(f"--celeb-filter needs this model's portraits of the celebrities ({cache}); run "
                             "--precompute-celeb-faces with --names listing them first")
        faces, dropped = inv.filter_by_generated(faces, inv.load_celeb_faces(cache), args.celeb_filter)
        log.info("[facecond] filter dropped %d names: %s", len(dropped), ", ".join(dropped))
    return faces


if __name__ == "__main__":
    main()
