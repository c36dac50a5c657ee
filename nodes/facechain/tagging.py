"""FaceChain's tagging of the prepared photos (Liu et al. 2023, "Tagging"): one trigger word for the person from
gender and age (FairFace in FaceChain; an insightface ``genderage`` model here), a caption per photo, and the
captioned training set written next to the images (``NNNN.png`` + ``NNNN.txt`` + ``metadata.jsonl`` in a folder
of ComfyUI's output directory; ComfyUI's LoadImageTextDataSetFromFolder reads that layout back from input/).

Thin wrapper over ``py/facechain/tagging.py`` and ``py/faces/genderage.py``. The captions also come out as a
STRING list: CLIPTextEncode turns it into one CONDITIONING per photo, which TrainLoraNode pairs with the latents.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re

import numpy as np
from PIL import Image

from ...py.facechain import tagging
from ...py.faces import genderage
from ...py.faces import onnx_pack as ifp
from ...py.weights import atomic
from ...py.weights.manifest import WeightsError
from .. import model_cache
from ..common import FACES, Progress, image_to_numpy
from ..faces.detect_embed import insightface_file, insightface_roots
from ..paths import write_dir, write_path
from .chain import check_faces, real_face

log = logging.getLogger("facecond")

CATEGORY = "facecond/facechain"
AUTO = "auto (genderage model)"
PUBLISHED_GENDERAGE = ("buffalo_l/genderage.onnx", "antelopev2/genderage.onnx")  # weights_manifest.json packs
_DATASET_FILE = re.compile(r"^(\d{4})\.(png|txt)$")


def genderage_choices() -> list[str]:
    found = ifp.list_models(insightface_roots(), "genderage")
    return found + [f for f in PUBLISHED_GENDERAGE if f not in found]


def _genderage_model(choice: str, node: str):
    """(session, mean, std) of the picked genderage file; ValueError naming the input, the file and the fixes."""
    try:
        path = insightface_file(choice, node, "genderage_model")
    except (FileNotFoundError, WeightsError) as e:
        raise ValueError(f"{node}: genderage_model {choice!r} is not installed ({e}). Put insightface's "
                         "genderage.onnx (it ships in the buffalo_l pack) into ComfyUI/models/insightface/models/"
                         f"buffalo_l/, or set trigger_word to one of {', '.join(tagging.TRIGGER_WORDS)} by hand."
                         ) from None
    kind = ifp.classify_file(path)
    if kind != "genderage":
        raise ValueError(f"{node}: genderage_model {choice!r} is a {kind} model, not insightface's genderage "
                         "(96x96 input, 3 outputs); pick PACK/genderage.onnx.")
    mean, std = genderage.normalisation(path)
    session = model_cache.load("onnx-genderage", path, model_cache.onnx_session, lambda s: s)
    model_cache.to_device(session)
    return session, mean, std


def write_dataset(folder: str, images: np.ndarray, captions: list[str]) -> list[str]:
    """``NNNN.png`` + ``NNNN.txt`` per image and FaceChain's ``metadata.jsonl`` (each file written atomically);
    older ``NNNN.*`` files of a larger set in the same folder are removed (only names of this pattern). Returns
    the PNG names."""
    os.makedirs(folder, exist_ok=True)
    names = [f"{i:04d}.png" for i in range(len(captions))]
    for name, img, text in zip(names, images, captions):
        png = io.BytesIO()
        Image.fromarray(np.clip(img * 255.0, 0, 255).astype(np.uint8)).save(png, format="PNG")
        atomic.write_bytes(os.path.join(folder, name), png.getvalue())
        atomic.write_text(os.path.join(folder, name[:-4] + ".txt"), text)
    for old in os.listdir(folder):
        m = _DATASET_FILE.match(old)
        if m and int(m.group(1)) >= len(captions):
            os.remove(os.path.join(folder, old))
    atomic.write_text(os.path.join(folder, "metadata.jsonl"),
                      "".join(json.dumps({"file_name": n, "text": t}) + "\n" for n, t in zip(names, captions)))
    return names


class FacecondFaceChainTagFaces:
    DESCRIPTION = ("FaceChain's tagging: gender and age of the person in the photos (insightface genderage model, "
                   "summed over the photos) mapped to one of FaceChain's six trigger words (a boy / a girl under "
                   "10, a handsome man / a beautiful woman 10-39, a mature man / a mature woman 40+), a caption "
                   "'<token>, <trigger word>' per prepared image, the captioned set written to output/"
                   "<dataset_name>/, and the TrainLoraNode steps for FaceChain's 20 epochs. No DeepDanbooru tags.")
    CATEGORY = CATEGORY
    FUNCTION = "tag"
    RETURN_TYPES = ("STRING", "STRING", "INT", "STRING")
    RETURN_NAMES = ("captions", "trigger_prompt", "steps", "report")
    OUTPUT_IS_LIST = (True, False, False, False)
    OUTPUT_TOOLTIPS = (
        "One caption per prepared image (a list): into CLIPTextEncode, then TrainLoraNode's positive.",
        "'<token>, <trigger word>' for the prompts that use the trained LoRA (FaceChain's trigger style).",
        "ceil(images x epochs / batch_size): into TrainLoraNode's steps.",
        "Per face: gender, age, age bin; the vote; where the set was written.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "images": ("IMAGE", {"tooltip": "FaceChainPreprocess's images: the prepared crops to caption and save."}),
            "image": ("IMAGE", {"tooltip": "The user's photos (the IMAGE that went into FaceDetectCrop and "
                                "FaceChainPreprocess)."}),
            "faces": (FACES, {"tooltip": "FaceDetectCrop's faces of 'image' (the FACES FaceChainPreprocess got): "
                              "the genderage model reads each face around its detector box."}),
            "genderage_model": (genderage_choices(), {"tooltip": "insightface's genderage.onnx (ships in the "
                                "buffalo_l and antelopev2 packs, models/insightface/models/PACK/). Only read with "
                                "trigger_word = auto."}),
            "trigger_word": ([AUTO, *tagging.TRIGGER_WORDS], {"default": AUTO, "tooltip":
                             "auto: from the genderage model. Or pick one of FaceChain's six words by hand (no "
                             "model needed)."}),
            "token": ("STRING", {"default": "sks", "tooltip": "The identity token that starts every caption "
                                 "(FaceChain: <sks>); use it in the prompts with the trained LoRA."}),
            "dataset_name": ("STRING", {"default": "facechain/person", "tooltip": "Folder under ComfyUI's output "
                                        "directory for NNNN.png + NNNN.txt + metadata.jsonl. If it exists and "
                                        "is not empty, a new numbered folder (name_00001 ...) is written unless "
                                        "overwrite. Empty: write nothing."}),
            "epochs": ("INT", {"default": 20, "min": 1, "max": 10000, "tooltip":
                       "Passes over the photos (FaceChain: 20); the steps output is images x epochs / batch_size."}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 1024, "tooltip":
                           "TrainLoraNode's batch_size, for the steps output."}),
        }, "optional": {
            "overwrite": ("BOOLEAN", {"default": False, "tooltip": "false: an existing, non-empty dataset_name "
                          "folder is kept and the set goes to dataset_name_00001 ... (the report says which). true: "
                          "write into it, replacing its NNNN files and metadata.jsonl."}),
        }}

    def tag(self, images, image, faces, genderage_model, trigger_word, token, dataset_name, epochs, batch_size,
            overwrite=False):
        node = "FaceChainTagFaces"
        folder = write_dir(node, "dataset_name", dataset_name.strip(), "output") if dataset_name.strip() else None
        crops = image_to_numpy(images, node, "images")
        photos = image_to_numpy(image, node)
        faces = check_faces(node, faces, photos)
        rows = [r for r in range(len(faces)) if real_face(faces, r)]
        if len(rows) != crops.shape[0]:
            raise ValueError(f"{node}: 'images' holds {crops.shape[0]} image(s) but 'faces' has {len(rows)} "
                             "detected face(s). Connect the images FaceChainPreprocess made from these faces.")
        lines = []
        if trigger_word == AUTO:
            session, mean, std = _genderage_model(genderage_model, node)
            progress = Progress(len(rows))
            pf, pm, ages, cache = [], [], [], {}
            for k, r in enumerate(rows):
                i = faces.source_index[r]
                if i not in cache:
                    cache[i] = genderage.to_uint8(photos[i])
                turn = genderage.upright_rotation(faces.affine_arcface[r].numpy())  # 0 unless on its side
                ga = genderage.predict(session, cache[i], faces.boxes[r].numpy(), mean, std, turn)
                pf.append(ga.p_female)
                pm.append(ga.p_male)
                ages.append(ga.age)
                lines.append(f"face {r} (photo {i}): {ga.describe()}, FairFace bin "
                             f"{tagging.AGE_BIN_STARTS[tagging.age_bin(ga.age)]}+")
                progress(k + 1)
            word = tagging.trigger_word(pf, pm, ages)
            lines.insert(0, f"trigger word: {word} (sum p_male {sum(pm):.3f} vs p_female {sum(pf):.3f}; "
                            f"ages {ages})")
        else:
            word = trigger_word
            lines.insert(0, f"trigger word: {word} (set by hand)")
        text = tagging.caption(token, word)
        captions = [text] * len(rows)
        steps = tagging.training_steps(len(rows), epochs, batch_size)
        lines.append(f"{len(rows)} image(s) x {epochs} epoch(s) / batch {batch_size} = {steps} steps")
        if folder is not None:
            def used(n: str) -> list[str]:  # a folder with files in it is taken (an empty one is not); a file too
                d = write_path(node, "dataset_name", n, "output")
                return [d] if os.path.isfile(d) or (os.path.isdir(d) and os.listdir(d)) else []

            name = atomic.free_name(dataset_name.strip(), used, overwrite)
            folder = write_dir(node, "dataset_name", name, "output")
            write_dataset(folder, crops, captions)
            lines.append(f"wrote {len(rows)} image(s) + captions to {folder}")
        log.info("[facecond] %s: %s", node, lines[0])
        return captions, tagging.caption(token, word), steps, "\n".join(lines)


NODE_CLASS_MAPPINGS = {"FacecondFaceChainTagFaces": FacecondFaceChainTagFaces}
NODE_DISPLAY_NAME_MAPPINGS = {"FacecondFaceChainTagFaces": "FaceChainTagFaces"}
