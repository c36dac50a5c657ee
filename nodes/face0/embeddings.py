"""Face-embedding nodes: interpolate / average / edit / perturb, random identities, save and load.

Face0 (Valevski et al. 2023, §3.2, §4) steers the face through its embedding; these nodes expose that
arithmetic (``py/face0/interpolate.py``) and files (``py/face0/embeds_io.py``) on the FACE_EMBEDS socket. Every output
keeps the embedder id of its inputs and is re-normalised when the inputs were L2-normalised.
"""

from __future__ import annotations

import logging
import os

import folder_paths
import torch

from ...py.face0.embeds_io import load_embeds, save_embeds
from ...py.face0.interpolate import add_noise, direction_edit, fit_prior, lerp, slerp, weighted_mean
from ...py.faces.types import FaceEmbeds
from ..common import FACE_EMBEDS, require_embeds, seed_input
from ..paths import check_write_name, finite_floats, load_file

log = logging.getLogger("facecond")

EMBEDS_FOLDER = "facecond_embeds"  # models/facecond/embeds, registered by nodes/model_paths.py
CATEGORY = "facecond/embeddings"
MODES = ["lerp", "slerp", "weighted_mean", "direction", "noise_only"]


def _files(folder: str) -> list[str]:
    return [f for f in folder_paths.get_filename_list(folder) if f.endswith(".safetensors")]


def _check(node: str, name: str, fe: FaceEmbeds | None, like: FaceEmbeds | None = None) -> torch.Tensor:
    """The rows of input ``name`` (needed by this mode), of the same model as ``like`` when given."""
    if fe is None:
        raise ValueError(f"{node}: this mode needs the {name} input; connect a {FACE_EMBEDS} to it.")
    if like is None:
        return require_embeds(node, name, fe)
    return require_embeds(node, name, fe, dim=like.dim, embedder=like.model, against="face_embeds holds",
                          fix="embeddings of different models cannot be mixed")


def _pairable(node: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if a.shape[0] == b.shape[0] or b.shape[0] == 1 or a.shape[0] == 1:
        n = max(a.shape[0], b.shape[0])
        return a.expand(n, -1), b.expand(n, -1)
    raise ValueError(f"{node}: face_embeds has {a.shape[0]} rows and {name_b} {b.shape[0]}; give one row, or as "
                     "many as the other (average several photos first with mode weighted_mean).")


def _parse_weights(node: str, text: str, n: int) -> list[float] | None:
    if not text.strip():
        return None
    try:
        w = [float(v) for v in text.replace(";", ",").split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{node}: weights must be comma-separated numbers, got {text!r}") from None
    if len(w) != n:
        raise ValueError(f"{node}: {len(w)} weights for {n} embeddings; give one weight per row or leave it empty.")
    return w


class EmbeddingInterpolate:
    @classmethod
    def VALIDATE_INPUTS(cls, t_start=None, t_end=None, strength=None, noise_sigma=None):  # NaN/inf, min/max
        return finite_floats(cls, "EmbeddingInterpolate", t_start=t_start, t_end=t_end, strength=strength,
                             noise_sigma=noise_sigma)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "face_embeds": (FACE_EMBEDS, {"tooltip": "e (or e0 for lerp/slerp; the photos to average)."}),
                "mode": (MODES, {"default": "lerp", "tooltip": "lerp/slerp: from face_embeds to face_embeds_b at "
                         "count values of t; weighted_mean: one embedding from all rows; direction: e + "
                         "strength·(direction_to − direction_from); noise_only: just add noise."}),
                "t_start": ("FLOAT", {"default": 0.0, "min": -2.0, "max": 3.0, "step": 0.05,
                                      "tooltip": "First t (0 = face_embeds). Outside [0, 1] extrapolates."}),
                "t_end": ("FLOAT", {"default": 1.0, "min": -2.0, "max": 3.0, "step": 0.05,
                                    "tooltip": "Last t (1 = face_embeds_b)."}),
                "count": ("INT", {"default": 5, "min": 1, "max": 64,
                                  "tooltip": "lerp/slerp: number of evenly spaced t values (the output batch)."}),
                "weights": ("STRING", {"default": "", "tooltip": "weighted_mean: comma-separated weight per row "
                                       "(empty: equal weights)."}),
                "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.05,
                                       "tooltip": "direction: the scale s in e + s·(to − from)."}),
                "noise_sigma": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 10.0, "step": 0.001,
                                          "tooltip": "Per-dimension standard deviation of Gaussian noise added to "
                                                     "every output (diversity; 0 = none). Unit-norm 512-d "
                                                     "embeddings: 0.01 is a small change."}),
                "seed": seed_input("Seed of the noise (same seed, same noise)."),
            },
            "optional": {
                "face_embeds_b": (FACE_EMBEDS, {"tooltip": "lerp/slerp: the face at t = 1."}),
                "direction_from": (FACE_EMBEDS, {"tooltip": "direction: the start of the edit direction "
                                                   "(e.g. the source face); several rows are averaged."}),
                "direction_to": (FACE_EMBEDS, {"tooltip": "direction: the end of the edit direction (e.g. the "
                                                 "same face 'with a mustache'); several rows are averaged."}),
            },
        }

    RETURN_TYPES = (FACE_EMBEDS,)
    OUTPUT_TOOLTIPS = ("The new embeddings (same embedder id; re-normalised if the inputs were).",)
    FUNCTION = "interpolate"
    CATEGORY = CATEGORY
    DESCRIPTION = "Face0 embedding arithmetic: interpolate two faces, average photos, direction edits, noise."

    def interpolate(self, face_embeds, mode, t_start, t_end, count, weights, strength, noise_sigma, seed,
                    face_embeds_b=None, direction_from=None, direction_to=None):
        node = "EmbeddingInterpolate"
        a = _check(node, "face_embeds", face_embeds)
        norm = face_embeds.normalized
        if mode in ("lerp", "slerp"):
            b = _check(node, "face_embeds_b", face_embeds_b, like=face_embeds)
            e0, e1 = _pairable(node, a, "face_embeds_b", b)
            norm = norm and face_embeds_b.normalized
            ts = torch.linspace(t_start, t_end, count) if count > 1 else torch.tensor([t_start])
            out = (lerp if mode == "lerp" else slerp)(e0, e1, ts, normalized=norm)
        elif mode == "weighted_mean":
            out = weighted_mean(a, _parse_weights(node, weights, a.shape[0]), normalized=norm)
        elif mode == "direction":
            d0, d1 = (_check(node, name, fe, like=face_embeds).mean(0, keepdim=True)
                      for name, fe in (("direction_from", direction_from), ("direction_to", direction_to)))
            out = direction_edit(a, d0, d1, strength, normalized=norm)
        elif mode == "noise_only":
            out = a.clone()
        else:
            raise ValueError(f"{node}: unknown mode {mode!r}; one of {MODES}")
        if noise_sigma > 0:
            out = add_noise(out, noise_sigma, seed, normalized=norm)
        src = face_embeds.source_index if mode in ("direction", "noise_only") else None
        return (face_embeds.with_embeds(out.contiguous(), normalized=norm, source_index=src),)


class RandomIdentity:
    @classmethod
    def VALIDATE_INPUTS(cls, spread=None):  # NaN/inf, min/max of float widgets
        return finite_floats(cls, "RandomIdentity", spread=spread)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "face_embeds": (FACE_EMBEDS, {"tooltip": "The set the distribution is fitted to (at least 2 "
                                "faces: a folder of photos, or a shared set loaded with LoadFaceEmbeds)."}),
                "seed": seed_input("Same seed, same set: the same characters every time."),
                "count": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": "Number of identities to draw."}),
                "components": ("INT", {"default": 1, "min": 1, "max": 32, "tooltip": "Gaussian mixture components "
                               "(1: one Gaussian; Face0 samples from a simple mixture)."}),
                "spread": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 3.0, "step": 0.05,
                                     "tooltip": "Scale of the deviation from the mean (0: the mean face)."}),
            },
        }

    RETURN_TYPES = (FACE_EMBEDS,)
    OUTPUT_TOOLTIPS = ("count random identities (source index -1), same embedder id as the set.",)
    FUNCTION = "sample"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Face0 consistent characters: draws identities from a diagonal Gaussian (mixture) fitted to a "
                   "set of embeddings; a fixed seed gives the same person in every generation.")

    def sample(self, face_embeds, seed, count, components, spread):
        node = "RandomIdentity"
        x = _check(node, "face_embeds", face_embeds)
        if len(face_embeds) < 2:
            raise ValueError(f"{node}: face_embeds has 1 embedding; a distribution needs at least 2. Embed more "
                             "photos (of different people for varied characters) or load a saved set.")
        prior = fit_prior(x, components=components, seed=0)  # fit is fixed; seed samples
        out = prior.sample(count, seed, spread)
        if face_embeds.normalized:
            out = torch.nn.functional.normalize(out, dim=-1)
        return (face_embeds.with_embeds(out, source_index=(-1,) * count),)


class SaveFaceEmbeds:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "face_embeds": (FACE_EMBEDS, {"tooltip": "The embeddings to store (an identity or a set)."}),
                "filename_prefix": ("STRING", {"default": "identity", "tooltip": "File name prefix; a counter "
                                    "and .safetensors are added. May contain a subfolder."}),
                "destination": (["embeds_folder", "output"], {"default": "embeds_folder", "tooltip": "embeds_folder: "
                                "models/facecond/embeds (LoadFaceEmbeds lists it); output: ComfyUI's output folder."}),
                "source": ("STRING", {"default": "", "tooltip": "Free text stored in the file (where it came from)."}),
            },
        }

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("embeds_name",)
    OUTPUT_TOOLTIPS = ("The saved file's name relative to its folder (what LoadFaceEmbeds lists).",)
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = CATEGORY
    DESCRIPTION = "Saves face embeddings as .safetensors with their embedder id, so an identity can be reused."

    def save(self, face_embeds, filename_prefix, destination, source):
        node = "SaveFaceEmbeds"
        _check(node, "face_embeds", face_embeds)
        if destination == "output":
            root = folder_paths.get_output_directory()
        else:
            try:
                root = folder_paths.get_folder_paths(EMBEDS_FOLDER)[0]
            except (KeyError, IndexError):
                raise ValueError(f"{node}: model folder {EMBEDS_FOLDER!r} is not registered; use destination "
                                 "'output' or update the pack.") from None
        check_write_name(node, "filename_prefix", filename_prefix,
                         "output" if destination == "output" else EMBEDS_FOLDER)
        full_dir, name, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, root)
        os.makedirs(full_dir, exist_ok=True)
        file = f"{name}_{counter:05}_.safetensors"
        save_embeds(face_embeds, os.path.join(full_dir, file), source=source)
        rel = os.path.join(subfolder, file) if subfolder else file
        log.info("[facecond] saved %d face embeddings to %s", len(face_embeds), os.path.join(full_dir, file))
        return {"ui": {"text": [rel]}, "result": (rel,)}


class LoadFaceEmbeds:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"embeds_name": (_files(EMBEDS_FOLDER), {
            "tooltip": "A face-embeddings file in models/facecond/embeds (written by SaveFaceEmbeds)."})}}

    RETURN_TYPES = (FACE_EMBEDS,)
    OUTPUT_TOOLTIPS = ("The stored embeddings with their embedder id and normalisation flag.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads face embeddings saved by SaveFaceEmbeds (an identity, or a set for RandomIdentity)."

    @classmethod
    def IS_CHANGED(cls, embeds_name):
        path = folder_paths.get_full_path(EMBEDS_FOLDER, embeds_name)
        return os.path.getmtime(path) if path else ""

    def load(self, embeds_name):
        embeds, _meta = load_file("LoadFaceEmbeds", "embeds_name", EMBEDS_FOLDER, embeds_name, load_embeds)
        return (embeds,)


NODE_CLASS_MAPPINGS = {
    "FacecondEmbeddingInterpolate": EmbeddingInterpolate,
    "FacecondRandomIdentity": RandomIdentity,
    "FacecondSaveFaceEmbeds": SaveFaceEmbeds,
    "FacecondLoadFaceEmbeds": LoadFaceEmbeds,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FacecondEmbeddingInterpolate": "EmbeddingInterpolate",
    "FacecondRandomIdentity": "RandomIdentity",
    "FacecondSaveFaceEmbeds": "SaveFaceEmbeds",
    "FacecondLoadFaceEmbeds": "LoadFaceEmbeds",
}
