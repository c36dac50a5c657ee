"""Face textual inversion nodes (Livshits 2023, after Gal et al. 2022): K learned token vectors for a person,
saved as a standard embedding that ComfyUI's ``embedding:NAME`` prompt syntax loads.

The maths is in ``py/celebbasis/inversion.py``; the training loop is ``py/celebbasis/train.train_face_ti``, which
shares its loss step with the Celeb Basis trainer and gets the ComfyUI model through ``nodes/training.word_model``.
"""

from __future__ import annotations

import logging
import os
import re

import comfy.model_management
import folder_paths
import torch

from ...py.celebbasis import basis as cb
from ...py.celebbasis import inversion as inv
from ...py.celebbasis.train import WordTrainConfig
from ...py.celebbasis.train import train_face_ti as train_vectors
from ...py.faces.types import FaceEmbeds
from ..common import CELEB_FACES, FACE_EMBEDS, Progress, seed_input, steps_input
from ..model_family import NATIVE_TOOLTIP, native_resolution, resolve_resolution
from ..paths import finite_floats, write_path
from .basis import FOLDER
from .celeb_photos import require_celeb_faces
from .files import BUNDLED, names_inputs, resolve_names
from .pseudo_words import text_encoder
from .training import (
    DEFAULT_CHECKPOINT_EVERY,
    normal_tensor,
    overwrite_input,
    pick,
    run_files,
    trainer_inputs,
    training_images,
    word_model,
)

log = logging.getLogger("facecond")

CATEGORY = "facecond/inversion"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$")
TI_STATES = "ti_states"  # face-TI trainer states, in models/facecond/celebbasis (the embeddings folder lists files)
FACE_PROMPT = "a close-up portrait photo of {}, face, detailed"
PRECOMPUTE_HINT = ("Run the PrecomputeCelebFaces node once with this checkpoint and the same FaceEmbed model (or "
                   "`python scripts/train_face_ti.py --precompute-celeb-faces --checkpoint ... --embedder ...`). It "
                   "generates one image per celebrity name (about 630 images: roughly 10-20 minutes at 512 px, 20 "
                   "steps on a modern GPU; hours on a CPU), detects and embeds the faces and caches them in "
                   "models/facecond/celebbasis.")


def model_hash(model, clip, node: str) -> str:
    """The celebrity-face cache key: the CLIP token table plus the UNet's first and last weights (cheap)."""
    params = list(model.model.diffusion_model.parameters())
    return inv.fingerprint([*text_encoder(clip, node).tables(), params[0], params[-1]])


def celeb_faces_path(model, clip, embedder: str, node: str) -> str:
    return os.path.join(folder_paths.get_folder_paths(FOLDER)[0], inv.faces_file_name(model_hash(model, clip, node),
                                                                                     embedder))


def precompute_celeb_faces(model, clip, vae, names: list[str], detector: str, embedder: str, *, steps: int = 20,
                           size: int = 0, seed: int = 0, prompt: str = FACE_PROMPT,
                           node: str = "PrecomputeCelebFaces") -> tuple[str, inv.CelebFaces]:
    """Generate one image per name with this model, detect (largest face) and embed it; write the cache.
    A cache already written for the same names and settings is read instead of generated again."""
    import nodes

    from ...py.faces.crop import NoFaceError
    from ..faces.detect_embed import FacecondFaceDetectCrop, FacecondFaceEmbed

    size = resolve_resolution(size, model, node, "size")  # 0: the model's native size
    settings = {"prompt": prompt, "steps": steps, "size": size, "seed": seed}
    old = _reusable_cache(model, clip, names, detector, embedder, settings, node)
    if old is not None:
        return old
    detect, embed = FacecondFaceDetectCrop(), FacecondFaceEmbed()
    neg = nodes.CLIPTextEncode().encode(clip, "cartoon, drawing, painting, blurry, several people")[0]
    latent = nodes.EmptyLatentImage().generate(size, size, 1)[0]
    rows, model_id = [], None
    bar = Progress(len(names))
    for i, name in enumerate(names):
        comfy.model_management.throw_exception_if_processing_interrupted()
        pos = nodes.CLIPTextEncode().encode(clip, prompt.format(name))[0]
        out = nodes.common_ksampler(model, seed + i, steps, 7.0, "euler", "normal", pos, neg, latent)[0]
        image = vae.decode(out["samples"])
        try:
            faces = detect.detect(image, detector=detector, select="largest", face_index=0, min_size=20,
                                  margin_scale=1.0, upright="off", no_face="error")[0]
        except NoFaceError:  # this name's image has no face: it stays out of the id choice
            faces = None
        if faces is not None:
            fe = embed.embed(faces, embedder, "bottleneck_512", "l2")[0]
            rows.append(fe.embeds[0].float())
            model_id = fe.model
        else:
            rows.append(None)
        bar(i + 1)
    if model_id is None:
        raise ValueError(f"{node}: no face was detected in any of the {len(names)} generated images; this model "
                         f"does not draw faces at {size} px / {steps} steps. Use the model's native size "
                         f"({native_resolution(model)} px: size 0) and more steps (20).")
    dim = next(r for r in rows if r is not None).shape[0]
    embeds = torch.stack([r if r is not None else torch.full((dim,), float("nan")) for r in rows])
    faces_cache = inv.CelebFaces(embeds, torch.tensor([r is not None for r in rows]), tuple(names),
                                 model_hash(model, clip, node), model_id,
                                 {**settings, "detector": detector, "embedder_choice": embedder})
    path = celeb_faces_path(model, clip, model_id, node)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    inv.save_celeb_faces(faces_cache, path)
    log.info("[facecond] %s: %d of %d names gave a face; wrote %s", node, int(faces_cache.found.sum()), len(names),
             path)
    return path, faces_cache


def _reusable_cache(model, clip, names, detector, embedder, settings, node):
    """(path, CelebFaces) of an existing cache for exactly these names and settings, else None. The cache file is
    keyed by the embedder's model id, known only after a face is embedded: every cache of this model is tried."""
    folder = folder_paths.get_folder_paths(FOLDER)[0]
    prefix = f"celeb_faces_{model_hash(model, clip, node)}_"
    if not os.path.isdir(folder):
        return None
    want = {**{k: str(v) for k, v in settings.items()}, "detector": detector}
    for f in sorted(os.listdir(folder)):
        if not (f.startswith(prefix) and f.endswith(".safetensors")):
            continue
        try:
            c = inv.load_celeb_faces(os.path.join(folder, f))
        except ValueError:
            continue
        if c.names == tuple(names) and all(c.extra.get(k) == v for k, v in want.items()) \
                and c.extra.get("embedder_choice") == embedder:
            log.info("[facecond] %s: reusing %s", node, f)
            return os.path.join(folder, f), c
    return None


class PrecomputeCelebFaces:
    DESCRIPTION = ("Once per checkpoint and face embedder: generates one portrait per celebrity name of the pack's "
                   "list with this model, detects and embeds each face and caches them in models/facecond/"
                   "celebbasis. TrainFaceTI's init='id' uses the cache to start from the celebrity who looks most "
                   "like your person. Cost: one generation per name (about 630; ~10-20 min at 512 px / 20 steps "
                   "on a modern GPU).")
    CATEGORY = CATEGORY
    FUNCTION = "precompute"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", CELEB_FACES)
    RETURN_NAMES = ("report", "celeb_faces")
    OUTPUT_TOOLTIPS = ("How many names gave a face, and the cache file.",
                       "The model's portraits' face embeddings: CelebPhotoFaces' generated_faces (the filter).")

    @classmethod
    def INPUT_TYPES(cls):
        from ..faces.detect_embed import FacecondFaceDetectCrop, FacecondFaceEmbed

        det = FacecondFaceDetectCrop.INPUT_TYPES()["required"]["detector"]
        emb = FacecondFaceEmbed.INPUT_TYPES()["required"]["model"]
        return {"required": {
            "model": ("MODEL", {"tooltip": "The checkpoint's model: it draws the celebrities."}),
            "clip": ("CLIP", {"tooltip": "The checkpoint's CLIP."}),
            "vae": ("VAE", {"tooltip": "Decodes the generated images."}),
            "detector": (det[0], {**det[1], "tooltip": "Face detector for the generated images (as FaceDetectCrop)."}),
            "embedder": (emb[0], {**emb[1], "tooltip": "Face recogniser: the same FaceEmbed model you will use for "
                         "your person's photos."}),
            "steps": steps_input("Sampling steps per celebrity.", most=200),
            "size": ("INT", {"default": 0, "min": 0, "max": 2048, "step": 8, "tooltip": "Image side in pixels. "
                     + NATIVE_TOOLTIP}),
            "seed": seed_input("Seed of the first name (name i uses seed + i).", control_after_generate=False),
        }, "optional": names_inputs()}

    def precompute(self, model, clip, vae, detector, embedder, steps, size, seed, names_list=BUNDLED, names_text=""):
        node = "PrecomputeCelebFaces"
        names = resolve_names(node, names_list, names_text)
        size = resolve_resolution(size, model, node, "size")
        path, c = precompute_celeb_faces(model, clip, vae, names, detector, embedder, steps=steps, size=size,
                                         seed=seed, node=node)
        return (f"{node}: {int(c.found.sum())} of {len(c.names)} names gave a face; {os.path.basename(path)}", c)


def face_vector(fe: FaceEmbeds, node: str) -> torch.Tensor:
    x = fe.embeds.float().mean(0)
    return torch.nn.functional.normalize(x, dim=0)


def train_face_ti(model, clip, vae, images: torch.Tensor, face_embeds: FaceEmbeds | None, *, init: str,
                  num_vectors: int, reparam: str, prompt_templates: str, config: WordTrainConfig, save_name: str,
                  node: str = "TrainFaceTI", progress=None, names: list[str] | None = None, resolution: int = 0,
                  celeb_faces: inv.CelebFaces | None = None, resume: bool = False, overwrite: bool = False,
                  checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY):
    """Check the inputs, pick the start vectors, build the trainer's callables from the ComfyUI objects, run
    ``py/celebbasis/train.train_face_ti`` on ``images`` (N, H, W, 3) and write
    ``models/embeddings/<name>.safetensors`` with its trainer state in ``models/facecond/celebbasis/ti_states/``
    as one pair (``RunFiles``: every ``checkpoint_every`` steps, at the end and when cancelled; ``resume`` continues
    save_name's run; ``overwrite``: a new run may replace save_name's files, else it takes a numbered name).
    ``names``: the celebrity-name list for rand2 / the generated
    cache (None: the bundled one); ``resolution``: the side the photos are trained at (0: the model's native
    size); ``celeb_faces``: celebrity faces for init='id' (CelebPhotoFaces: real photos; else the generated
    cache). Returns (file path, vectors (K, d), losses, init description).
    TrainFaceTI and scripts/train_face_ti.py run this."""
    seed = config.seed

    def paths_of(name: str) -> tuple[str, str]:
        return (write_path(node, "save_name", name, "embeddings", ".safetensors"),
                write_path(node, "save_name", f"{TI_STATES}/{name}", FOLDER, ".state.safetensors"))

    if not NAME_RE.match(save_name):
        raise ValueError(f"{node}: save_name {save_name!r} must be letters, digits, _ or - (it becomes the word "
                         "in embedding:NAME), at most 64 characters.")
    path = write_path(node, "save_name", save_name, "embeddings", ".safetensors")  # before training: CON, NUL...
    if images is None or images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"{node}: images must be a batch of photos of the person (IMAGE), got "
                         f"{None if images is None else tuple(images.shape)}.")
    if init not in inv.INIT_MODES:
        raise ValueError(f"{node}: init must be one of {inv.INIT_MODES}, got {init!r}.")
    if reparam not in inv.REPARAM:
        raise ValueError(f"{node}: reparam must be one of {list(inv.REPARAM)}, got {reparam!r}.")
    templates = cb.split_templates(prompt_templates, node)
    if not templates:
        raise ValueError(f"{node}: prompt_templates is empty; give at least one line with {{}}.")
    enc = text_encoder(clip, node)
    names = list(names) if names is not None else cb.load_names()
    face = None
    if init == "id":
        if not isinstance(face_embeds, FaceEmbeds) or len(face_embeds) == 0:
            raise ValueError(f"{node}: init='id' needs face_embeds of the person; connect FaceEmbed.")
        face = face_vector(face_embeds, node)
    if init == "id" and celeb_faces is not None:
        require_celeb_faces(node, "celeb_faces", celeb_faces, "CelebPhotoFaces or PrecomputeCelebFaces",
                            face_embeds.model, "face_embeds")
        names = list(celeb_faces.names)
    elif init == "id":
        path = celeb_faces_path(model, clip, face_embeds.model, node)
        if not os.path.isfile(path):
            raise ValueError(f"{node}: init='id' needs celebrity face embeddings for this checkpoint and embedder "
                             f"{face_embeds.model!r} ({os.path.basename(path)}), which are not there. "
                             + PRECOMPUTE_HINT)
        try:
            celeb_faces = inv.load_celeb_faces(path)
        except ValueError as e:
            raise ValueError(f"{node}: init='id': {e} Or run PrecomputeCelebFaces again.") from None
    start, what = inv.init_vectors(init, enc.tables(), enc.tokenize, num_vectors, names=names, seed=seed,
                                   celeb_faces=celeb_faces, face=face)
    images, size = training_images(model, images, resolution, node)
    wm = word_model(model, clip, vae, templates, node, k=num_vectors)
    files = run_files(node, save_name, paths_of, resume=resume, overwrite=overwrite)
    table_hash = cb.table_hash(enc.tables())

    def save(vectors, trainer):
        meta = {"init": what, "reparam": reparam, "steps": trainer.step, "resolution": size, "seed": seed,
                "losses": trainer.losses[-10:], "table_hash": table_hash,
                "face_embedder": face_embeds.model if face_embeds else ""}
        meta["family"] = enc.family
        files.save(inv.embedding_file(vectors, enc.keys, meta, enc.dims), trainer, {"node": node, "reparam": reparam})

    try:
        final, trainer = train_vectors(
            wm, normal_tensor(start), images, config, reparam=reparam, dims=enc.dims, resume_from=files.resume_from,
            save=save,
            checkpoint_every=checkpoint_every, on_step=progress,
            check_interrupt=comfy.model_management.throw_exception_if_processing_interrupted)
    except comfy.model_management.InterruptProcessingException:
        files.interrupted()
        raise
    return files.result, final, trainer.losses, what


class TrainFaceTI:
    DESCRIPTION = ("Face textual inversion (Livshits 2023): learns K token vectors for a person from a few photos "
                   "with the plain denoising loss on this model (model and CLIP frozen), at the model's resolution. "
                   "Init 'face' ('human face'), 'rand2' (two random celebrity names: a first name and a last name) "
                   "or 'id' (the celebrity who looks most like the person: CelebPhotoFaces from real photos, or "
                   "PrecomputeCelebFaces once); optional log-norm reparameterisation v = a^n·d/||d||, else l2 0.01; "
                   "Adam β = (0.9, 0.98). SD1.x, SD2.x and SDXL (vectors for both CLIP-L and CLIP-G, each with its "
                   "own log-norm). Writes models/embeddings/<save_name>.safetensors, a standard embedding (SDXL: "
                   "clip_l and clip_g tensors): write embedding:<save_name> in any prompt. Deterministic for a seed. "
                   "Saves the vectors and the trainer state every checkpoint_every steps, at the end and when "
                   "cancelled; resume=true continues save_name's run. An existing embedding is kept: a new run takes "
                   "a numbered name unless overwrite=true (embedding_name says which).")
    CATEGORY = CATEGORY
    FUNCTION = "train"
    OUTPUT_NODE = True
    RETURN_TYPES = ("CLIP", "STRING", "STRING")
    RETURN_NAMES = ("clip", "embedding_name", "report")
    OUTPUT_TOOLTIPS = ("The input CLIP (a clone), passed on so text nodes after it run once the embedding exists; "
                       "write embedding:<save_name> in their prompts.",
                       "The embedding's name: write embedding:<name> in a prompt.", "Losses and settings.")

    @classmethod
    def VALIDATE_INPUTS(cls, learning_rate=None):  # NaN/inf, min/max of float widgets
        return finite_floats(cls, "TrainFaceTI", learning_rate=learning_rate)

    @classmethod
    def INPUT_TYPES(cls):
        shared = trainer_inputs(
            clip="Its CLIP (frozen): SD1.x, SD2.x or SDXL (then the word has vectors for both CLIP-L and CLIP-G).",
            images="Photos of the person (face crops work best; the paper uses 8).",
            word="word", steps="Optimiser steps (paper: 400).",
            seed="Fixes the rand2 names, noise, timesteps, templates and augmentation.")
        return {"required": {
            **pick(shared, "model", "clip", "vae", "images"),
            "init": (list(inv.INIT_MODES), {"default": "face", "tooltip": "Start vectors: 'face' = 'human face', "
                     "'rand2' = the first-name token of one random celebrity and the last-name token of another, "
                     "'id' = the most similar celebrity (needs face_embeds, and celeb_faces or "
                     "PrecomputeCelebFaces once)."}),
            "num_vectors": ("INT", {"default": 2, "min": 1, "max": 16, "tooltip": "K: tokens the word takes."}),
            "reparam": (list(inv.REPARAM), {"default": "log_norm_e", "tooltip": "log_norm_2 / log_norm_e learn "
                        "v = a^n·d/||d|| (keeps the norm near the vocabulary's); none = plain vectors with l2 0.01."}),
            **pick(shared, "prompt_templates", "steps", "learning_rate", "seed", "augment"),
            "save_name": ("STRING", {"default": "face_ti_person", "tooltip": "Embedding name (letters, digits, _ -): "
                          "written to models/embeddings/<name>.safetensors. If it exists, a new run writes "
                          "<name>_00001 ... (see overwrite); embedding_name says which."}),
        }, "optional": {
            "face_embeds": (FACE_EMBEDS, {"tooltip": "The person's face embeddings (FaceEmbed); needed for "
                            "init='id'."}),
            **pick(shared, "resolution", "names_list", "names_text"),
            "celeb_faces": (CELEB_FACES, {"tooltip": "init='id': the celebrities to compare the person with, from "
                            "CelebPhotoFaces (real photos, one sub-folder per name; the paper's way) or "
                            "PrecomputeCelebFaces. Not connected: the cache PrecomputeCelebFaces wrote for this "
                            "checkpoint."}),
            **pick(shared, "resume", "checkpoint_every"),
            "overwrite": overwrite_input("the embedding save_name (or its trainer state)"),
        }}

    def train(self, model, clip, vae, images, init, num_vectors, reparam, prompt_templates, steps, learning_rate,
              seed, augment, save_name, face_embeds=None, resolution=0, names_list=BUNDLED, names_text="",
              celeb_faces=None, resume=False, checkpoint_every=DEFAULT_CHECKPOINT_EVERY, overwrite=False):
        node = "TrainFaceTI"
        names = resolve_names(node, names_list, names_text)
        path, _, losses, what = train_face_ti(
            model, clip, vae, images, face_embeds, init=init, num_vectors=num_vectors, reparam=reparam,
            prompt_templates=prompt_templates, save_name=save_name, node=node, progress=Progress(steps, label=node),
            config=WordTrainConfig(steps=steps, lr=learning_rate, seed=seed, augment=augment), names=names,
            resolution=resolution, celeb_faces=celeb_faces, resume=resume, overwrite=overwrite,
            checkpoint_every=checkpoint_every)
        name = os.path.basename(path)[:-len(".safetensors")]
        loss = f"loss first {losses[0]:.4f} last {losses[-1]:.4f}" if losses else "nothing to do"
        report = (f"{node}: {len(losses)} steps, {images.shape[0]} images, K={num_vectors}, init {what}, "
                  f"reparam {reparam}; {loss}; use embedding:{name}")
        return (clip.clone(), name, report)


NODE_CLASS_MAPPINGS = {
    "FacecondTrainFaceTI": TrainFaceTI,
    "FacecondPrecomputeCelebFaces": PrecomputeCelebFaces,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FacecondTrainFaceTI": "TrainFaceTI",
    "FacecondPrecomputeCelebFaces": "PrecomputeCelebFaces",
}
