"""Celeb Basis files (Yuan et al. 2023, "Inserting Anybody in Diffusion Models via Celeb Basis", arXiv
2306.00926): the celebrity-name lists, trained coefficient MLPs and saved identities in
models/facecond/celebbasis, and the nodes that save and load identities. File formats: ``py/celebbasis/coeffs.py``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import folder_paths

from ...py.celebbasis import basis as cb
from ...py.celebbasis.coeffs import BasisFacts, CoeffMLP, load_coeffs, load_mlp, save_coeffs
from .. import model_cache
from ..common import CELEB_COEFFS
from ..paths import check_write_name, load_file, read_path

CATEGORY = "facecond/celebbasis"
FOLDER = "facecond_celebbasis"  # models/facecond/celebbasis: coefficient MLPs, saved identities (older name lists)
NAMES_FOLDER = "facecond_names"  # models/facecond/names: celebrity-name lists (.txt, one name a line)
BUNDLED = "bundled"  # the names_list choice for the pack's own list (data/celeb_names.txt)


def names_list_files() -> list[str]:
    """The .txt name lists in models/facecond/names (what the names_list dropdown offers after 'bundled')."""
    if NAMES_FOLDER not in folder_paths.folder_names_and_paths:
        return []
    return [f for f in folder_paths.get_filename_list(NAMES_FOLDER) if f.endswith(".txt")]


def names_inputs() -> dict:
    """The two optional inputs every node that builds the celebrity-name basis (or draws from its names) takes."""
    return {
        "names_list": ([BUNDLED, *names_list_files()], {"default": BUNDLED, "tooltip": "Celebrity-name list: "
                       "'bundled' = the pack's list; or a .txt file in models/facecond/names (one name a line, # "
                       "comments), e.g. the Celeb Basis paper's list. names_text overrides it."}),
        "names_text": ("STRING", {"default": "", "multiline": True, "tooltip": "Celebrity names typed here, one a "
                       "line; when not empty they replace names_list."}),
    }


def resolve_names(node: str, names_list: str = BUNDLED, names_text: str = "") -> list[str]:
    """The names the node uses: names_text when it has any text, else the names_list file (read inside
    models/facecond/names only), else the bundled list. ValueError naming the node and the input."""
    if names_text and names_text.strip():
        try:
            return cb.parse_names(names_text, "names_text")
        except ValueError as e:
            raise ValueError(f"{node}: names_text: {e}.") from None
    if not names_list or names_list == BUNDLED:
        return cb.load_names()
    path = read_path(node, "names_list", NAMES_FOLDER, names_list)
    if not path.endswith(".txt"):
        raise ValueError(f"{node}: names_list {names_list!r} is not a .txt file; pick a name list (one name a line) "
                         "from models/facecond/names, or 'bundled'.")
    try:
        return cb.load_names(path)
    except ValueError as e:
        raise ValueError(f"{node}: names_list {names_list!r}: {e}.") from None


def names_files() -> dict[str, str]:
    """Every name list a file's names hash may point at: the bundled list, models/facecond/names and (as before)
    .txt files in models/facecond/celebbasis."""
    files = {"(pack list)": str(cb.NAMES_FILE)}
    for folder in (NAMES_FOLDER, FOLDER):
        if folder not in folder_paths.folder_names_and_paths:
            continue
        for root in folder_paths.get_folder_paths(folder):
            if os.path.isdir(root):
                for f in sorted(os.listdir(root)):
                    if f.endswith(".txt"):
                        files.setdefault(f, os.path.join(root, f))
    return files


def names_with_hash(h: str, node: str, what: str, given: list[str] | None = None) -> list[str]:
    """The name list whose hash is ``h``: ``given`` (the node's names inputs) first, then every known file."""
    if given is not None and cb.names_hash(given) == h:
        return given
    for path in names_files().values():
        try:
            names = cb.load_names(path)
        except ValueError:  # a broken list in the folder is not the one we look for
            continue
        if cb.names_hash(names) == h:
            return names
    raise ValueError(f"{node}: {what} was made with a celebrity-name list (hash {h}) that is neither the pack's list, "
                     "the names_list / names_text given, nor a .txt file in models/facecond/names. Put the list it "
                     "was trained with there (or paste it into names_text).")


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
