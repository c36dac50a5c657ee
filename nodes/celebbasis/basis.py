"""Celeb Basis nodes (Yuan et al. 2023, "Inserting Anybody in Diffusion Models via Celeb Basis", arXiv
2306.00926): a face as a pseudo-word in the loaded model's own celebrity-name space.

The maths is in ``py/celebbasis/basis.py`` (basis), ``py/celebbasis/coeffs.py`` (MLP, files) and
``py/celebbasis/train.py`` (training). These classes check inputs, call it and wrap results.

A pseudo-word enters a cloned CLIP through ``pseudo_words.py``; the trainer's ComfyUI-side helpers
are in ``training.py``, the names lists, MLP and identity files in ``files.py`` (all in ``nodes/celebbasis/``).
Several identities: chain the node with different words.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import comfy.model_management
import comfy.model_sampling
import folder_paths
import torch

from ...py.celebbasis import basis as cb
from ...py.celebbasis.coeffs import BasisFacts, CelebCoeffs, fp16_exact, mlp_file
from ...py.celebbasis.train import WordTrainConfig, parse_identities, train_celeb_basis
from ...py.faces.types import FaceEmbeds
from .. import model_cache
from ..common import CELEB_COEFFS, CELEB_MLP, FACE_EMBEDS, Progress, require_embeds
from ..paths import finite_floats, write_path
from .files import (
    BUNDLED,
    FOLDER,
    CelebMLP,
    load_celeb_mlp,
    mlp_files,
    names_inputs,
    names_with_hash,
    resolve_names,
)
from .pseudo_words import TextEncoders, add_pseudo_word, text_encoder
from .training import (
    DEFAULT_CHECKPOINT_EVERY,
    DEFAULT_TEMPLATES,  # noqa: F401  (declared in training.py with the shared widgets; the CLIs import it from here)
    normal_tensor,
    overwrite_input,
    pick,
    run_files,
    trainer_inputs,
    training_images,
    word_model,
)

log = logging.getLogger("facecond")

CATEGORY = "facecond/celebbasis"


# --- basis for a CLIP ----------------------------------------------------------------------------------------
def basis_for(clip, names: list[str], p: int, node: str) -> tuple[cb.CelebBasis, TextEncoders]:
    """The celebrity-name basis of this CLIP's token table(s) (SDXL: one PCA over CLIP-L and CLIP-G side by side,
    see ``py/celebbasis/basis.py``), marked with the CLIP's model family."""
    enc = text_encoder(clip, node)
    try:
        return dataclasses.replace(cb.cached_basis(enc.tables(), names, enc.tokenize, p), family=enc.family), enc
    except ValueError as e:  # e.g. fewer than 2 names of two or more tokens
        raise ValueError(f"{node}: {e}. Give at least 2 celebrity names of two or more tokens each (names_list / "
                         "names_text, or the list the coefficient MLP was trained with).") from None


def _mean_face(node: str, fe: FaceEmbeds, mlp: CelebMLP) -> torch.Tensor:
    x = require_embeds(node, "face_embeds", fe, dim=mlp.mlp.fc.in_features, embedder=mlp.embedder,
                       against="the coefficient MLP takes")
    m = x.mean(0, keepdim=True)  # several photos of one person: their embeddings are averaged
    return torch.nn.functional.normalize(m, dim=-1) if fe.normalized else m


class CelebBasisCoeffs:
    DESCRIPTION = ("Celeb Basis: makes a face a word. From a face embedding (through a trained coefficient MLP) or "
                   "saved coefficients, builds the two token embeddings C̄_k + B_k·α_k in the celebrity-name basis "
                   "of this CLIP's own token table and returns a cloned CLIP in which pseudo_word (e.g. <alice>) "
                   "means that person: write it in any prompt ('<alice> as an astronaut'). Chain the node for "
                   "several people. SD1.x, SD2.x and SDXL (one basis over CLIP-L and CLIP-G side by side: the same "
                   "coefficients drive both encoders).")
    CATEGORY = CATEGORY
    FUNCTION = "apply"
    RETURN_TYPES = ("CLIP", CELEB_COEFFS)
    RETURN_NAMES = ("clip", "coefficients")
    OUTPUT_TOOLTIPS = ("A clone of the CLIP that knows the pseudo-word (the input CLIP is unchanged).",
                       "The identity's 2 x p coefficients (save them with SaveCelebCoeffs).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip": ("CLIP", {"tooltip": "The checkpoint's CLIP (SD1.x, SD2.x or SDXL). Its token table(s) define "
                     "the basis (SDXL: CLIP-L's and CLIP-G's)."}),
            "pseudo_word": ("STRING", {"default": "<alice>", "tooltip": "The new word, written <name>; use it in "
                            "prompts exactly like this."}),
            "mlp_name": (["none", *mlp_files()], {"default": "none", "tooltip": "Trained coefficient MLP in "
                         "models/facecond/celebbasis (from TrainCelebBasis). Not needed with coefficients."}),
        }, "optional": {
            "face_embeds": (FACE_EMBEDS, {"tooltip": "The person's face embedding(s), from FaceEmbed with the "
                            "embedder the MLP was trained on; several photos are averaged."}),
            "celeb_mlp": (CELEB_MLP, {"tooltip": "A coefficient MLP straight from TrainCelebBasis (overrides "
                          "mlp_name)."}),
            "coefficients": (CELEB_COEFFS, {"tooltip": "Saved coefficients (LoadCelebCoeffs); when connected, "
                             "face_embeds and the MLP are not used."}),
            **_names_inputs_here(),
        }}

    def apply(self, clip, pseudo_word, mlp_name, face_embeds=None, celeb_mlp=None, coefficients=None,
              names_list=BUNDLED, names_text=""):
        node = "CelebBasisCoeffs"
        given = None if names_list == BUNDLED and not (names_text or "").strip() else \
            resolve_names(node, names_list, names_text)
        if coefficients is not None:
            c = coefficients
            names = names_with_hash(c.facts.names_hash, node, "coefficients", given)
            basis, _ = basis_for(clip, names, c.facts.p, node)
            c.facts.check(basis, f"{node}: coefficients")
        else:
            if celeb_mlp is None:
                if mlp_name == "none":
                    raise ValueError(f"{node}: nothing to make the word from. Connect coefficients (LoadCelebCoeffs), "
                                     "or face_embeds plus a coefficient MLP (mlp_name or celeb_mlp).")
                celeb_mlp = load_celeb_mlp(mlp_name, node, "mlp_name")
            if face_embeds is None:
                raise ValueError(f"{node}: the coefficient MLP needs face_embeds; connect FaceEmbed.")
            if given is not None and cb.names_hash(given) != celeb_mlp.facts.names_hash:
                raise ValueError(f"{node}: names_list / names_text give a celebrity-name list ({len(given)} names, "
                                 f"hash {cb.names_hash(given)}) other than the one the coefficient MLP was trained "
                                 f"with ({len(celeb_mlp.names)} names, hash {celeb_mlp.facts.names_hash}). The MLP "
                                 "carries its own list: leave names_list at 'bundled' and names_text empty.")
            basis, _ = basis_for(clip, list(celeb_mlp.names), celeb_mlp.facts.p, node)
            celeb_mlp.facts.check(basis, f"{node}: the coefficient MLP")
            device = model_cache.to_device(celeb_mlp.mlp)
            with torch.inference_mode():
                alpha = celeb_mlp.mlp(_mean_face(node, face_embeds, celeb_mlp).to(device))[0].cpu()
            # stored as fp16 in files: round now so a saved identity gives the same conditioning bit for bit
            c = CelebCoeffs(fp16_exact(alpha), dataclasses.replace(celeb_mlp.facts, family=basis.family),
                            source=f"mlp:{mlp_name}/{face_embeds.model}")
        vectors = basis.embeddings(c.coeffs.float())
        return (add_pseudo_word(clip, pseudo_word, vectors, node), c)


def _names_inputs_here() -> dict:
    spec = names_inputs()
    spec["names_list"][1]["tooltip"] += (" CelebBasisCoeffs: only needed for coefficients whose list is not in "
                                         "models/facecond/names; an MLP carries its own list.")
    return spec


def train_celeb_mlp(model, clip, vae, images, face_embeds: FaceEmbeds, *, identities: str, prompt_templates: str,
                    p: int, config: WordTrainConfig, save_name: str, resume: bool = False, overwrite: bool = False,
                    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY, node: str = "TrainCelebBasis", on_step=None,
                    names: list[str] | None = None, resolution: int = 0) -> tuple[CelebMLP, str, str]:
    """Check the inputs, build the trainer's callables from the ComfyUI objects, run ``train_celeb_basis`` and
    write models/facecond/celebbasis/<name>.safetensors + <name>.state.safetensors as one pair (``RunFiles``),
    every ``checkpoint_every`` steps, at the end and when cancelled. ``resume``: continue save_name's run;
    ``overwrite``: a new run may replace save_name's files (else it takes a new numbered name). ``names``: the
    celebrity-name list (None: the bundled one); ``resolution``: the side the photos are trained at (0: the
    model's native size). Returns (CELEB_MLP, file name relative to that folder, report). TrainCelebBasis and
    scripts/train_celebbasis.py run this."""
    def paths_of(name: str) -> tuple[str, str]:
        return (write_path(node, "save_name", name, FOLDER, ".safetensors"),
                write_path(node, "save_name", name, FOLDER, ".state.safetensors"))

    paths_of(save_name)  # a bad name is refused before anything else
    n = images.shape[0]
    require_embeds(node, "face_embeds", face_embeds)
    if len(face_embeds) != n:
        raise ValueError(f"{node}: {n} images but {len(face_embeds)} face embeddings; give one face per image "
                         "(FaceDetectCrop select=largest, no_face=error).")
    ids = parse_identities(identities, n, node)
    templates = cb.split_templates(prompt_templates, node)
    names = list(names) if names is not None else cb.load_names()
    images, size = training_images(model, images, resolution, node)
    basis, _ = basis_for(clip, names, p, node)
    # the server runs nodes under inference mode: tensors autograd saves must be normal ones (grad_safe)
    basis = dataclasses.replace(basis, mean=normal_tensor(basis.mean), basis=normal_tensor(basis.basis))
    wm = word_model(model, clip, vae, templates, node)
    root = folder_paths.get_folder_paths(FOLDER)[0]
    files = run_files(node, save_name, paths_of, resume=resume, overwrite=overwrite)

    def save(mlp, trainer):
        files.save(mlp_file(mlp, basis, embedder=face_embeds.model, names=names, steps=trainer.step), trainer,
                   {"node": node, "basis_id": basis.basis_id})

    try:
        mlp, trainer = train_celeb_basis(
            wm, basis, images, face_embeds.embeds, ids, config, normalized=face_embeds.normalized,
            resume_from=files.resume_from, save=save, checkpoint_every=checkpoint_every, on_step=on_step,
            check_interrupt=comfy.model_management.throw_exception_if_processing_interrupted)
    except comfy.model_management.InterruptProcessingException:
        files.interrupted()
        raise
    facts = BasisFacts(basis.p, basis.table_hash, basis.names_hash, family=basis.family)
    losses = trainer.losses
    name = os.path.relpath(files.result, root)
    resumed = f"resumed {save_name!r}; " if files.resume_from else ""
    report = (f"{node}: {trainer.step} steps, {max(ids) + 1} identities, {n} images at {size} px, {len(basis.names)} "
              f"names, p={basis.p}; loss first "
              f"{losses[0]:.4f} last {losses[-1]:.4f}" if losses else f"{node}: nothing to do")
    report += f"; {resumed}wrote {name}"
    return CelebMLP(mlp, face_embeds.model, tuple(names), facts), name, report


class TrainCelebBasis:
    DESCRIPTION = ("Trains the Celeb Basis coefficient MLP (face embedding -> 2 x p coefficients, one linear layer + "
                   "L2 norm) with the plain denoising loss on this model: UNet, text encoder, basis and face model "
                   "are frozen, only the MLP learns. One or several photos, one or several people (jointly, one "
                   "shared MLP). Deterministic for a seed. Saves the MLP and its trainer state every "
                   "checkpoint_every steps, at the end and when cancelled; resume=true continues save_name's run "
                   "exactly where it stopped (the result equals an uninterrupted run). An existing save_name is "
                   "kept: a new run takes a numbered name unless overwrite=true.")
    CATEGORY = CATEGORY
    FUNCTION = "train"
    OUTPUT_NODE = True
    RETURN_TYPES = (CELEB_MLP, "STRING", "STRING")
    RETURN_NAMES = ("celeb_mlp", "mlp_name", "report")
    OUTPUT_TOOLTIPS = ("The trained MLP (connect to CelebBasisCoeffs).",
                       "The file written to models/facecond/celebbasis.", "Losses and settings.")

    @classmethod
    def VALIDATE_INPUTS(cls, learning_rate=None):  # NaN/inf, min/max of float widgets
        return finite_floats(cls, "TrainCelebBasis", learning_rate=learning_rate)

    @classmethod
    def INPUT_TYPES(cls):
        shared = trainer_inputs(
            clip="Its CLIP (frozen); its token table(s) define the basis (SDXL: CLIP-L's and CLIP-G's side by side).",
            images="Photos of the person/people (face crops work best), one per face embedding.",
            word="pseudo-word", steps="Optimiser steps in total.",
            seed="Fixes the MLP init, noise, timesteps, templates and augmentation.")
        return {"required": {
            **pick(shared, "model", "clip", "vae", "images"),
            "face_embeds": (FACE_EMBEDS, {"tooltip": "One embedding per image (FaceEmbed), row i for image i."}),
            "identities": ("STRING", {"default": "", "tooltip": "One label per image ('a,a,b'): images with the same "
                           "label are one person. Empty: all images are one person."}),
            **pick(shared, "prompt_templates", "steps", "learning_rate"),
            "p": ("INT", {"default": 512, "min": 1, "max": 4096, "tooltip": "Basis size (principal components per "
                  "token); capped at names - 1 and the token width (SDXL: 768 + 1280)."}),
            **pick(shared, "seed", "augment"),
            "save_name": ("STRING", {"default": "celeb_mlp", "tooltip": "File name (without extension) in "
                          "models/facecond/celebbasis; the trainer state goes next to it as .state.safetensors. "
                          "If it exists, a new run writes save_name_00001 ... (see overwrite); mlp_name says which."}),
            **pick(shared, "resume"),
        }, "optional": {
            **pick(shared, "resolution", "names_list", "names_text", "checkpoint_every"),
            "overwrite": overwrite_input("save_name's MLP or trainer state"),
        }}

    def train(self, model, clip, vae, images, face_embeds, identities, prompt_templates, steps, learning_rate, p,
              seed, augment, save_name, resume, resolution=0, names_list=BUNDLED, names_text="",
              checkpoint_every=DEFAULT_CHECKPOINT_EVERY, overwrite=False):
        node = "TrainCelebBasis"
        names = resolve_names(node, names_list, names_text)
        return train_celeb_mlp(model, clip, vae, images, face_embeds, identities=identities,
                               prompt_templates=prompt_templates, p=p, save_name=save_name, resume=resume,
                               overwrite=overwrite, checkpoint_every=checkpoint_every, names=names,
                               resolution=resolution,
                               config=WordTrainConfig(steps=steps, lr=learning_rate, seed=seed, augment=augment),
                               node=node, on_step=Progress(steps, label=node))


NODE_CLASS_MAPPINGS = {
    "FacecondCelebBasisCoeffs": CelebBasisCoeffs,
    "FacecondTrainCelebBasis": TrainCelebBasis,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FacecondCelebBasisCoeffs": "CelebBasisCoeffs",
    "FacecondTrainCelebBasis": "TrainCelebBasis",
}
