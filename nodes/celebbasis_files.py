"""Celeb Basis files (Yuan et al. 2023, "Inserting Anybody in Diffusion Models via Celeb Basis", arXiv
2306.00926): the celebrity-name lists, trained coefficient MLPs and saved identities in
models/facecond/celebbasis, and the nodes that save and load identities. File formats: ``py/celebbasis/coeffs.py``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import folder_paths

from ..py.celebbasis import basis as cb
from ..py.celebbasis.coeffs import BasisFacts, CoeffMLP, load_coeffs, load_mlp, save_coeffs
from . import model_cache
from .common import CELEB_COEFFS
from .paths import check_write_name, load_file

CATEGORY = "facecond/celebbasis"
FOLDER = "facecond_celebbasis"  # models/facecond/celebbasis: coefficient MLPs, names lists, saved identities


def names_files() -> dict[str, str]:
    files = {"(pack list)": str(cb.NAMES_FILE)}
    for root in folder_paths.get_folder_paths(FOLDER):
        if os.path.isdir(root):
            for f in sorted(os.listdir(root)):
                if f.endswith(".txt"):
                    files[f] = os.path.join(root, f)
    return files


def names_with_hash(h: str, node: str, what: str) -> list[str]:
    for path in names_files().values():
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


def mlp_files() -> list[str]:
    return [f for f in folder_paths.get_filename_list(FOLDER) if f.endswith(".safetensors")
            and not f.endswith(".state.safetensors")]


def load_celeb_mlp(name: str, node: str = "CelebBasisCoeffs", input_name: str = "mlp_name") -> CelebMLP:
    def build(path):
        mlp, info = load_mlp(path)
        return CelebMLP(mlp, info["embedder"], tuple(info["names"]), info["facts"])
    return model_cache.load_picked("celeb-mlp", node, input_name, FOLDER, name, build, lambda c: c.mlp)


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
            "coefficients": (CELEB_COEFFS, {"tooltip": "From CelebBasisCoeffs."}),
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
    RETURN_TYPES = (CELEB_COEFFS,)
    RETURN_NAMES = ("coefficients",)
    OUTPUT_TOOLTIPS = ("The identity's coefficients and the basis they belong to.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"coeffs_name": (mlp_files(), {"tooltip": "A coefficients file in "
                                                            "models/facecond/celebbasis (SaveCelebCoeffs)."})}}

    def load(self, coeffs_name):
        return (load_file("LoadCelebCoeffs", "coeffs_name", FOLDER, coeffs_name, load_coeffs),)


NODE_CLASS_MAPPINGS = {
    "FacecondSaveCelebCoeffs": SaveCelebCoeffs,
    "FacecondLoadCelebCoeffs": LoadCelebCoeffs,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FacecondSaveCelebCoeffs": "SaveCelebCoeffs",
    "FacecondLoadCelebCoeffs": "LoadCelebCoeffs",
}
