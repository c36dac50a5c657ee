"""Celebrity faces from real photos for face textual inversion's ``id`` init (Livshits 2023, "Textual inversion
modified for faces": the celebrity base is "images of celebrities, filtered by face recognition against the
model's own generations").

A folder inside ComfyUI's input folder holds one sub-folder per celebrity, named after the person ("Tom Hanks"
or "Tom_Hanks"), with their photos. Each photo's largest face is detected and embedded with the pack's
FaceDetectCrop / FaceEmbed; a name's row is the cosine centroid of its photos
(``py/celebbasis/inversion.celeb_faces_from_photos``). Optionally (the paper's filter) names whose portrait,
as the loaded model draws it (PrecomputeCelebFaces), is not recognised as the photos' person are dropped
(``filter_by_generated``).
"""

from __future__ import annotations

import logging
import os

import comfy.model_management
import numpy as np
import torch

from ...py.celebbasis import inversion as inv
from ..common import CELEB_FACES, Progress
from ..paths import finite_floats, read_dir

log = logging.getLogger("facecond")

CATEGORY = "facecond/inversion"
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def photo_folders(root: str) -> list[tuple[str, list[str]]]:
    """[(name, photo paths)] for each sub-folder of ``root`` that holds photos, sorted; '_' in a folder name is
    a space ("Tom_Hanks" -> "Tom Hanks")."""
    out = []
    for sub in sorted(os.listdir(root)):
        path = os.path.join(root, sub)
        if not os.path.isdir(path) or sub.startswith("."):
            continue
        photos = [os.path.join(path, f) for f in sorted(os.listdir(path)) if f.lower().endswith(PHOTO_SUFFIXES)]
        if photos:
            out.append((" ".join(sub.replace("_", " ").split()), photos))
    return out


def _load(path: str) -> torch.Tensor:
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        img = ImageOps.exif_transpose(im).convert("RGB")
        return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]


def embed_photo_folder(root: str, detector: str, embedder: str, node: str) -> tuple[inv.CelebFaces, str]:
    """(CelebFaces of the folder's names, report): every photo's largest face, embedded with FaceEmbed's
    ``embedder`` (FaceNet: the 512-d bottleneck; insightface: L2-normalised), as FaceEmbed does for the person."""
    from ...py.faces.crop import NoFaceError
    from ..faces.detect_embed import FacecondFaceDetectCrop, FacecondFaceEmbed

    people = photo_folders(root)
    if not people:
        raise ValueError(f"{node}: folder {root} has no sub-folder with photos ({', '.join(PHOTO_SUFFIXES)}). Make "
                         "one sub-folder per celebrity, named after them (e.g. 'Tom Hanks/1.jpg').")
    detect, embed = FacecondFaceDetectCrop(), FacecondFaceEmbed()
    rows, model_id, missing = [], None, []
    bar = Progress(sum(len(p) for _, p in people))
    done = 0
    for name, photos in people:
        found = []
        for path in photos:
            comfy.model_management.throw_exception_if_processing_interrupted()
            try:
                faces = detect.detect(_load(path), detector=detector, select="largest", face_index=0, min_size=20,
                                      margin_scale=1.0, upright="rotate_if_no_face", no_face="error")[0]
            except NoFaceError:
                faces = None
            except OSError as e:
                raise ValueError(f"{node}: {path} is not a readable image ({e}); remove it from the folder.") from None
            if faces is not None:
                fe = embed.embed(faces, embedder, "bottleneck_512", "auto")[0]
                found.append(fe.embeds[:1].float())
                model_id = fe.model
            done += 1
            bar(done)
        rows.append(torch.cat(found) if found else None)
        if not found:
            missing.append(name)
    if model_id is None:
        raise ValueError(f"{node}: no face was found in any photo under {root}; give photos with a visible face.")
    faces = inv.celeb_faces_from_photos([n for n, _ in people], rows, model_id, source=root)
    report = (f"{len(people) - len(missing)} of {len(people)} celebrities have a face in their photos "
              f"({done} photos, {model_id})" + (f"; no face: {', '.join(missing)}" if missing else ""))
    return faces, report



def require_celeb_faces(node: str, input_name: str, value, sources: str, embedder: str, other: str) -> inv.CelebFaces:
    """``value`` as CelebFaces embedded with ``embedder`` (the model of ``other``); else a ValueError with the fix."""
    if not isinstance(value, inv.CelebFaces):
        raise ValueError(f"{node}: {input_name} must come from {sources}, got {type(value).__name__}.")
    if value.embedder != embedder:
        raise ValueError(f"{node}: {input_name} were embedded with {value.embedder!r} but {other} with {embedder!r}; "
                         "pick the same FaceEmbed model in both.")
    return value

class CelebPhotoFaces:
    DESCRIPTION = ("Face TI init='id' from real celebrity photos (Livshits 2023): a folder in ComfyUI's input "
                   "folder with one sub-folder per celebrity (named after them, e.g. 'Tom Hanks') of their photos. "
                   "Each name's faces are embedded and averaged; TrainFaceTI starts from the name whose faces are "
                   "closest to your person. Optional (the paper's filter): connect PrecomputeCelebFaces' "
                   "celeb_faces to drop names the model does not draw recognisably.")
    CATEGORY = CATEGORY
    FUNCTION = "embed"
    RETURN_TYPES = (CELEB_FACES, "STRING")
    RETURN_NAMES = ("celeb_faces", "report")
    OUTPUT_TOOLTIPS = ("One face embedding per celebrity name (connect to TrainFaceTI's celeb_faces).",
                       "How many names have faces, and which the filter dropped.")

    @classmethod
    def VALIDATE_INPUTS(cls, threshold=None):
        return finite_floats(cls, "CelebPhotoFaces", threshold=threshold)

    @classmethod
    def INPUT_TYPES(cls):
        from ..faces.detect_embed import FacecondFaceDetectCrop, FacecondFaceEmbed

        det = FacecondFaceDetectCrop.INPUT_TYPES()["required"]["detector"]
        emb = FacecondFaceEmbed.INPUT_TYPES()["required"]["model"]
        return {"required": {
            "folder": ("STRING", {"default": "celeb_photos", "tooltip": "Folder inside ComfyUI's input folder: one "
                       "sub-folder per celebrity, named after them ('Tom Hanks' or 'Tom_Hanks'), holding photos."}),
            "detector": (det[0], {**det[1], "tooltip": "Face detector for the photos (as FaceDetectCrop)."}),
            "embedder": (emb[0], {**emb[1], "tooltip": "Face recogniser: the same FaceEmbed model you use for your "
                         "person's photos (the Livshits paper's F: a face-recognition network; ArcFace = an "
                         "insightface recogniser such as antelopev2/glintr100.onnx)."}),
            "threshold": ("FLOAT", {"default": 0.3, "min": -1.0, "max": 1.0, "step": 0.01, "tooltip":
                          "With generated_faces: keep a name only if the model's portrait of it has face cosine >= "
                          "this with the name's photos."}),
        }, "optional": {
            "generated_faces": (CELEB_FACES, {"tooltip": "PrecomputeCelebFaces' celeb_faces (the model's own "
                                "portraits, same embedder): turns on the filter. Not connected: no filter."}),
        }}

    def embed(self, folder, detector, embedder, threshold, generated_faces=None):
        node = "CelebPhotoFaces"
        root = read_dir(node, "folder", folder)
        faces, report = embed_photo_folder(root, detector, embedder, node)
        if generated_faces is not None:
            require_celeb_faces(node, "generated_faces", generated_faces, "PrecomputeCelebFaces", faces.embedder,
                                "the photos")
            faces, dropped = inv.filter_by_generated(faces, generated_faces, threshold)
            report += (f"; filter (model's portraits, cosine >= {threshold:g}) kept {int(faces.found.sum())}"
                       + (f", dropped {', '.join(dropped)}" if dropped else ""))
            if not bool(faces.found.any()):
                raise ValueError(f"{node}: the filter dropped every celebrity ({report}). Lower threshold, or check "
                                 "that the model draws these people (PrecomputeCelebFaces' names must include them).")
        log.info("[facecond] %s: %s", node, report)
        return (faces, f"{node}: {report}")


NODE_CLASS_MAPPINGS = {"FacecondCelebPhotoFaces": CelebPhotoFaces}
NODE_DISPLAY_NAME_MAPPINGS = {"FacecondCelebPhotoFaces": "CelebPhotoFaces"}
