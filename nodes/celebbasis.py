"""Celeb Basis nodes (Yuan et al. 2023): a face as a pseudo-word in the loaded model's own celebrity-name space.

The maths is in ``py/celebbasis/basis.py`` (basis), ``py/celebbasis/coeffs.py`` (MLP, files), ``py/train/core.py`` and
``py/train/augment.py`` (training). These classes check inputs, call it and wrap results.

A pseudo-word enters a cloned CLIP through ``nodes/pseudo_words.py``; the trainer's ComfyUI-side helpers
are in ``nodes/training.py``. Several identities: chain the node with different words.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass

import comfy.model_management
import comfy.model_sampling
import comfy.utils
import folder_paths
import torch

from ..py.celebbasis import basis as cb
from ..py.celebbasis.coeffs import (
    BasisFacts,
    CelebCoeffs,
    CoeffMLP,
    fp16_exact,
    load_coeffs,
    load_mlp,
    new_mlp,
    save_coeffs,
    save_mlp,
)
from ..py.faces.types import FaceEmbeds
from ..py.train.augment import augment as augment_images
from ..py.train.core import TrainConfig, Trainer, denoising_loss, sample_noise, sample_sigmas
from .paths import check_write_name, finite_floats, load_file, write_path
from .pseudo_words import TextEncoder, add_pseudo_word, text_encoder
from .training import (
    encode_images,
    encode_with,
    model_denoiser,
    normal_tensor,
    template_tokens,
    trainable_clip,
)

log = logging.getLogger("facecond")

CATEGORY = "facecond/celebbasis"
FOLDER = "facecond_celebbasis"  # models/facecond/celebbasis: coefficient MLPs, names lists, saved identities
DEFAULT_TEMPLATES = "a photo of {}\na depiction of {}\na close-up photo of {}\na portrait of {}\n{} smiling"


# --- basis for a CLIP ----------------------------------------------------------------------------------------
def _names_files() -> dict[str, str]:
    files = {"(pack list)": str(cb.NAMES_FILE)}
    for root in folder_paths.get_folder_paths(FOLDER):
        if os.path.isdir(root):
            for f in sorted(os.listdir(root)):
                if f.endswith(".txt"):
                    files[f] = os.path.join(root, f)
    return files


def basis_for(clip, names: list[str], p: int, node: str) -> tuple[cb.CelebBasis, TextEncoder]:
    enc = text_encoder(clip, node)
    return cb.cached_basis(enc.table(), names, enc.tokenize, p), enc


def names_with_hash(h: str, node: str, what: str) -> list[str]:
    for path in _names_files().values():
        names = cb.load_names(path)
        if cb.names_hash(names) == h:
            return names
    raise ValueError(f"{node}: {what} was made with a celebrity-name list (hash {h}) that is neither the pack's list "
                     f"nor a .txt file in models/facecond/celebbasis. Put the list it was trained with there.")


@dataclass(frozen=True)
class CelebMLP:
    """The CELEB_MLP socket: a coefficient MLP and what it was trained for."""

    mlp: CoeffMLP
    embedder: str
    names: tuple[str, ...]
    facts: BasisFacts


def _mlp_files() -> list[str]:
    return [f for f in folder_paths.get_filename_list(FOLDER) if f.endswith(".safetensors")
            and not f.endswith(".state.safetensors")]


def _mean_face(node: str, fe: FaceEmbeds, mlp: CelebMLP) -> torch.Tensor:
    if not isinstance(fe, FaceEmbeds) or len(fe) == 0:
        raise ValueError(f"{node}: face_embeds is empty or missing; connect FaceEmbed (a face must be found).")
    x = fe.embeds.float()
    if x.shape[1] != mlp.mlp.fc.in_features or mlp.embedder not in ("any", fe.model):
        raise ValueError(f"{node}: face_embeds come from {fe.model!r} ({x.shape[1]}-d) but the coefficient MLP was "
                         f"trained on {mlp.embedder!r} ({mlp.mlp.fc.in_features}-d). Embed with that model.")
    if not torch.isfinite(x).all():
        raise ValueError(f"{node}: face_embeds contain NaN or inf; re-embed the faces.")
    m = x.mean(0, keepdim=True)  # several photos of one person: their embeddings are averaged
    return torch.nn.functional.normalize(m, dim=-1) if fe.normalized else m


class CelebBasisCoeffs:
    DESCRIPTION = ("Celeb Basis: makes a face a word. From a face embedding (through a trained coefficient MLP) or "
                   "saved coefficients, builds the two token embeddings C̄_k + B_k·α_k in the celebrity-name basis "
                   "of this CLIP's own token table and returns a cloned CLIP in which pseudo_word (e.g. <alice>) "
                   "means that person: write it in any prompt ('<alice> as an astronaut'). Chain the node for "
                   "several people. SD1.x/SD2.x.")
    CATEGORY = CATEGORY
    FUNCTION = "apply"
    RETURN_TYPES = ("CLIP", "CELEB_COEFFS")
    RETURN_NAMES = ("clip", "coefficients")
    OUTPUT_TOOLTIPS = ("A clone of the CLIP that knows the pseudo-word (the input CLIP is unchanged).",
                       "The identity's 2 x p coefficients (save them with SaveCelebCoeffs).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip": ("CLIP", {"tooltip": "The checkpoint's CLIP (SD1.x / SD2.x). Its token table defines the basis."}),
            "pseudo_word": ("STRING", {"default": "<alice>", "tooltip": "The new word, written <name>; use it in "
                            "prompts exactly like this."}),
            "mlp_name": (["none", *_mlp_files()], {"default": "none", "tooltip": "Trained coefficient MLP in "
                         "models/facecond/celebbasis (from TrainCelebBasis). Not needed with coefficients."}),
        }, "optional": {
            "face_embeds": ("FACE_EMBEDS", {"tooltip": "The person's face embedding(s), from FaceEmbed with the "
                            "embedder the MLP was trained on; several photos are averaged."}),
            "celeb_mlp": ("CELEB_MLP", {"tooltip": "A coefficient MLP straight from TrainCelebBasis (overrides "
                          "mlp_name)."}),
            "coefficients": ("CELEB_COEFFS", {"tooltip": "Saved coefficients (LoadCelebCoeffs); when connected, "
                             "face_embeds and the MLP are not used."}),
        }}

    def apply(self, clip, pseudo_word, mlp_name, face_embeds=None, celeb_mlp=None, coefficients=None):
        node = "CelebBasisCoeffs"
        if coefficients is not None:
            c = coefficients
            names = names_with_hash(c.facts.names_hash, node, "coefficients")
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
            basis, _ = basis_for(clip, list(celeb_mlp.names), celeb_mlp.facts.p, node)
            celeb_mlp.facts.check(basis, f"{node}: the coefficient MLP")
            with torch.inference_mode():
                alpha = celeb_mlp.mlp(_mean_face(node, face_embeds, celeb_mlp))[0]
            # stored as fp16 in files: round now so a saved identity gives the same conditioning bit for bit
            c = CelebCoeffs(fp16_exact(alpha), celeb_mlp.facts, source=f"mlp:{mlp_name}/{face_embeds.model}")
        vectors = basis.embeddings(c.coeffs.float())
        return (add_pseudo_word(clip, pseudo_word, vectors, node), c)


def load_celeb_mlp(name: str, node: str = "CelebBasisCoeffs", input_name: str = "mlp_name") -> CelebMLP:
    mlp, info = load_file(node, input_name, FOLDER, name, load_mlp)
    return CelebMLP(mlp, info["embedder"], tuple(info["names"]), info["facts"])


class SaveCelebCoeffs:
    DESCRIPTION = "Saves an identity's Celeb Basis coefficients (2 x p fp16, about 2 KB) with its basis facts."
    CATEGORY = CATEGORY
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("file",)
    OUTPUT_TOOLTIPS = ("The saved file's name in models/facecond/celebbasis (what LoadCelebCoeffs lists).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "coefficients": ("CELEB_COEFFS", {"tooltip": "From CelebBasisCoeffs."}),
            "filename_prefix": ("STRING", {"default": "identities/person", "tooltip": "Name under models/facecond/"
                                "celebbasis; a counter and .safetensors are added. May contain a subfolder."}),
        }}

    def save(self, coefficients, filename_prefix):
        check_write_name("SaveCelebCoeffs", "filename_prefix", filename_prefix, FOLDER)
        root = folder_paths.get_folder_paths(FOLDER)[0]
        full_dir, name, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, root)
        os.makedirs(full_dir, exist_ok=True)
        file = f"{name}_{counter:05}_.safetensors"
        save_coeffs(coefficients, os.path.join(full_dir, file))
        return (os.path.join(subfolder, file) if subfolder else file,)


class LoadCelebCoeffs:
    DESCRIPTION = "Loads saved Celeb Basis coefficients (an identity) for CelebBasisCoeffs."
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("CELEB_COEFFS",)
    RETURN_NAMES = ("coefficients",)
    OUTPUT_TOOLTIPS = ("The identity's coefficients and the basis they belong to.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"coeffs_name": (_mlp_files(), {"tooltip": "A coefficients file in "
                                                            "models/facecond/celebbasis (SaveCelebCoeffs)."})}}

    def load(self, coeffs_name):
        return (load_file("LoadCelebCoeffs", "coeffs_name", FOLDER, coeffs_name, load_coeffs),)


def parse_identities(text: str, n: int, node: str) -> list[int]:
    if not text.strip():
        return [0] * n
    labels = [s.strip() for s in text.replace(";", ",").split(",") if s.strip()]
    if len(labels) != n:
        raise ValueError(f"{node}: identities has {len(labels)} labels for {n} images; give one per image, e.g. "
                         "'a,a,b' (or leave it empty: one person).")
    order = list(dict.fromkeys(labels))
    return [order.index(s) for s in labels]


class TrainCelebBasis:
    DESCRIPTION = ("Trains the Celeb Basis coefficient MLP (face embedding -> 2 x p coefficients, one linear layer + "
                   "L2 norm) with the plain denoising loss on this model: UNet, text encoder, basis and face model "
                   "are frozen, only the MLP learns. One or several photos, one or several people (jointly, one "
                   "shared MLP). Deterministic for a seed; cancel any time; resume=true continues a saved run.")
    CATEGORY = CATEGORY
    FUNCTION = "train"
    OUTPUT_NODE = True
    RETURN_TYPES = ("CELEB_MLP", "STRING", "STRING")
    RETURN_NAMES = ("celeb_mlp", "mlp_name", "report")
    OUTPUT_TOOLTIPS = ("The trained MLP (connect to CelebBasisCoeffs).",
                       "The file written to models/facecond/celebbasis.", "Losses and settings.")

    @classmethod
    def VALIDATE_INPUTS(cls, learning_rate=None):  # NaN/inf, min/max of float widgets
        return finite_floats(cls, "TrainCelebBasis", learning_rate=learning_rate)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The diffusion model to train against (frozen)."}),
            "clip": ("CLIP", {"tooltip": "Its CLIP (frozen); its token table defines the basis."}),
            "vae": ("VAE", {"tooltip": "Encodes the photos to latents."}),
            "images": ("IMAGE", {"tooltip": "Photos of the person/people (face crops work best), one "
                       "per face embedding."}),
            "face_embeds": ("FACE_EMBEDS", {"tooltip": "One embedding per image (FaceEmbed), row i for image i."}),
            "identities": ("STRING", {"default": "", "tooltip": "One label per image ('a,a,b'): images with the same "
                           "label are one person. Empty: all images are one person."}),
            "prompt_templates": ("STRING", {"default": DEFAULT_TEMPLATES, "multiline": True, "tooltip":
                                 "One prompt per line; {} is where the person's pseudo-word goes."}),
            "steps": ("INT", {"default": 400, "min": 1, "max": 100000, "tooltip": "Optimiser steps in total."}),
            "learning_rate": ("FLOAT", {"default": 0.005, "min": 1e-6, "max": 1.0, "step": 1e-4, "round": 1e-6,
                              "tooltip": "Adam learning rate."}),
            "p": ("INT", {"default": 512, "min": 1, "max": 4096, "tooltip": "Basis size (principal components per "
                  "token); capped at names - 1 and the token width."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "tooltip": "Fixes the MLP init, "
                     "noise, timesteps, templates and augmentation."}),
            "augment": ("BOOLEAN", {"default": True, "tooltip": "Colour jitter, random resize and shift."}),
            "save_name": ("STRING", {"default": "celeb_mlp", "tooltip": "File name (without extension) in "
                          "models/facecond/celebbasis; the trainer state goes next to it as .state.safetensors."}),
            "resume": ("BOOLEAN", {"default": False, "tooltip": "Continue from save_name's trainer state "
                       "if it exists."}),
        }}

    def train(self, model, clip, vae, images, face_embeds, identities, prompt_templates, steps, learning_rate, p,
              seed, augment, save_name, resume):
        node = "TrainCelebBasis"
        path = write_path(node, "save_name", save_name, FOLDER, ".safetensors")
        state_path = write_path(node, "save_name", save_name, FOLDER, ".state.safetensors")
        n = images.shape[0]
        if not isinstance(face_embeds, FaceEmbeds) or len(face_embeds) != n:
            raise ValueError(f"{node}: {n} images but {len(face_embeds) if face_embeds is not None else 0} face "
                             "embeddings; give one face per image (FaceDetectCrop select=largest, no_face=error).")
        ids = parse_identities(identities, n, node)
        templates = [t.strip() for t in prompt_templates.splitlines() if t.strip()]
        names = cb.load_names()
        basis, _ = basis_for(clip, names, p, node)
        denoise, sigmas, device = model_denoiser(model, node)
        # the server runs nodes under inference mode: tensors autograd saves must be normal ones (grad_safe)
        basis = dataclasses.replace(basis, mean=normal_tensor(basis.mean), basis=normal_tensor(basis.basis))
        feats = normal_tensor(face_embeds.embeds.float())
        tclip = trainable_clip(clip)
        with torch.inference_mode(False):
            people = torch.stack([feats[[i for i in range(n) if ids[i] == k]].mean(0) for k in range(max(ids) + 1)])
            if face_embeds.normalized:
                people = torch.nn.functional.normalize(people, dim=-1)
            mlp = new_mlp(feats.shape[1], basis, seed).to(device)
        tokens = template_tokens(clip, templates, node)
        pixels = images[..., :3].movedim(-1, 1).float()  # (N, 3, H, W)
        fixed_latents = None if augment else encode_images(vae, model, images)
        people = people.to(device)

        def loss_fn(step, g):
            i = int(torch.randint(0, n, (1,), generator=g))
            t = int(torch.randint(0, len(tokens), (1,), generator=g))
            if fixed_latents is None:
                img = augment_images(pixels[i:i + 1], g).movedim(1, -1)
                x0 = encode_images(vae, model, img).to(device)
            else:
                x0 = fixed_latents[i:i + 1].to(device)
            sigma, _ = sample_sigmas(sigmas, 1, g)
            noise = sample_noise(x0, g)
            vectors = basis.embeddings(mlp(people[ids[i]:ids[i] + 1])[0])
            context = encode_with(tclip, tokens[t], vectors)
            return denoising_loss(denoise, x0, context.to(device), sigma, noise)

        trainer = Trainer(dict(mlp.named_parameters()), TrainConfig(steps=steps, lr=learning_rate, seed=seed))
        root = folder_paths.get_folder_paths(FOLDER)[0]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if resume and os.path.isfile(state_path):
            trainer.load(state_path)
            log.info("[facecond] %s: resuming %s at step %d", node, save_name, trainer.step)
        pbar = comfy.utils.ProgressBar(steps)

        def progress(done, total, loss):
            pbar.update_absolute(done, total)
            if done == 1 or done % 10 == 0 or done == total:
                log.info("[facecond] %s step %d/%d loss %.5f", node, done, total, loss)

        try:
            trainer.run(loss_fn, progress=progress,
                        check_interrupt=comfy.model_management.throw_exception_if_processing_interrupted)
        finally:  # an interrupted run can be resumed from its last finished step
            trainer.save(state_path, {"node": node, "basis_id": basis.basis_id})
        mlp = mlp.cpu().eval()
        save_mlp(mlp, path, basis, embedder=face_embeds.model, names=names, steps=trainer.step)
        facts = BasisFacts(basis.p, basis.table_hash, basis.names_hash)
        losses = trainer.losses
        report = (f"{node}: {trainer.step} steps, {max(ids) + 1} identities, {n} images, p={basis.p}; loss first "
                  f"{losses[0]:.4f} last {losses[-1]:.4f}" if losses else f"{node}: nothing to do")
        return (CelebMLP(mlp, face_embeds.model, tuple(names), facts), os.path.relpath(path, root), report)


NODE_CLASS_MAPPINGS = {
    "FacecondCelebBasisCoeffs": CelebBasisCoeffs,
    "FacecondSaveCelebCoeffs": SaveCelebCoeffs,
    "FacecondLoadCelebCoeffs": LoadCelebCoeffs,
    "FacecondTrainCelebBasis": TrainCelebBasis,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FacecondCelebBasisCoeffs": "CelebBasisCoeffs",
    "FacecondSaveCelebCoeffs": "SaveCelebCoeffs",
    "FacecondLoadCelebCoeffs": "LoadCelebCoeffs",
    "FacecondTrainCelebBasis": "TrainCelebBasis",
}
