"""Faces in, identities out: FaceDetectCrop (IMAGE -> FACES), FaceEmbed (FACES -> FACE_EMBEDS), FaceSimilarity.

Thin wrappers over ``py/faces/`` (``crop``, ``detect``, ``embed``, ``similarity``): they check the
inputs, pick the model files (weights manifest, ComfyUI model folders ``facenet`` and ``insightface``),
and wrap the results. Models live in the pack's one model cache under ComfyUI's model management
(``nodes/model_cache.py``).
"""

from __future__ import annotations

import logging
import os

import folder_paths
import numpy as np

from ...py.faces import crop, detect, dlib_rec, draw, embed, similarity
from ...py.faces import onnx_pack as ifp
from ...py.faces.types import FaceEmbeds, Faces
from ...py.weights import manifest as weights
from .. import model_cache
from ..common import FACE_EMBEDS, FACES, Progress, image_to_numpy, numpy_to_image, require_embeds, require_faces
from ..model_paths import resolve_weight, verify_user_file
from ..paths import finite_floats

log = logging.getLogger("facecond")

CATEGORY = "facecond/faces"
FACENET_MANIFEST = "facenet_vggface2"
_MTCNN_FILES = {"pnet.pt", "rnet.pt", "onet.pt"}


def insightface_roots() -> list[str]:
    return list(folder_paths.get_folder_paths("insightface"))


def facenet_files() -> list[str]:
    files = folder_paths.get_filename_list("facenet")
    return [f"facenet/{f}" for f in files if os.path.basename(f) not in _MTCNN_FILES
            and not os.path.basename(f).startswith("20180402-114759-vggface2")]


# Files of the published insightface packs (weights_manifest.json) by role; listed even before they are
# downloaded, so picking one fetches the pack (or says where to put it).
PUBLISHED_PACK_FILES = {
    "detection": ("antelopev2/scrfd_10g_bnkps.onnx", "buffalo_l/det_10g.onnx"),
    "recognition": ("antelopev2/glintr100.onnx", "buffalo_l/w600k_r50.onnx"),
}


def insightface_choices(kind: str) -> list[str]:
    found = ifp.list_models(insightface_roots(), kind)
    return found + [f for f in PUBLISHED_PACK_FILES[kind] if f not in found]


def insightface_file(choice: str, node: str, input_name: str):
    """Path of an insightface-pack file picked in a dropdown: found (either pack layout), or the published
    pack fetched through the manifest; a known file is checked against its manifest sha256."""
    pack = choice.rsplit("/", 1)[0] if "/" in choice else None
    try:
        path = ifp.resolve_model(insightface_roots(), choice)
    except FileNotFoundError as e:
        if pack is None or pack not in weights.load_manifest():
            raise FileNotFoundError(f"{node}: {input_name} {choice!r}: {e}") from None
        resolve_weight(pack, node=node)  # downloads the pack, or raises "put ... into ... (from URL)"
        path = ifp.resolve_model(insightface_roots(), choice)
    if pack is not None:
        pins = weights.pins_for("insightface", f"models/{choice}")
        if pins is not None:
            entry, sha256, size = pins
            weights.verify_file(path, sha256, size, url=entry.url, label=f"{entry.id}: {choice}")
    return path


def _detector(choice: str, node: str):
    """The detector, from the pack's model cache, on ComfyUI's device (``nodes/model_cache.py``)."""
    if choice == "mtcnn":
        paths = tuple(resolve_weight(f"mtcnn_{n}", node=node) for n in ("pnet", "rnet", "onet"))
        det = model_cache.load("mtcnn", paths, lambda p: detect.MTCNN(*p), lambda d: d.nets)
        model_cache.to_device(det.nets)
        return det
    path = insightface_file(choice, node, "detector")
    kind = ifp.classify_file(path)
    if kind != "detection":
        raise ValueError(f"{node}: {choice} is a {kind} model, not a face detector; pick an SCRFD file "
                         "(det_*.onnx / scrfd_*.onnx) or mtcnn.")
    det = model_cache.load("onnx-detector", path, lambda p: detect.SCRFD(model_cache.onnx_session(p),
                           name=f"scrfd:{choice}"), lambda d: d.session)
    model_cache.to_device(det.session)
    return det


def dlib_files(node: str | None = None):
    """(shape predictor, ResNet) files of the installed face-recognition-models; None when dlib is not installed
    (``node`` given: raise the install line instead)."""
    try:
        return dlib_rec.model_files()
    except dlib_rec.DlibMissing as e:
        if node is None:
            return None
        raise ValueError(f"{node}: model {dlib_rec.MODEL_NAME!r}: {e}") from None


def dlib_model(part: str, node: str | None = None):
    """dlib's shape predictor (``part`` "shape": FaceDetectCrop's 150-px chips) or its ResNet ("resnet": FaceEmbed /
    IdentityScore with dlib_resnet_v1), each its own entry of the model cache, handed to ComfyUI's model management
    like every other model (so its unload frees them). None when dlib is not installed (``node`` given: raise the
    install line instead)."""
    files = dlib_files(node)
    if files is None:
        return None
    shape_file, net_file = files
    if part == "shape":
        model = model_cache.load("dlib-shape", shape_file, dlib_rec.DlibShapePredictor, lambda m: m)
    else:
        model = model_cache.load("dlib-resnet", net_file, dlib_rec.DlibResNet, lambda m: m)
    model_cache.to_device(model)
    return model


def recogniser_choices() -> list[str]:
    """FaceEmbed's / IdentityScore's model list (appended to only: saved workflows keep their values)."""
    return [FACENET_MANIFEST, *facenet_files(), *insightface_choices("recognition"), dlib_rec.MODEL_NAME]


class FacecondFaceDetectCrop:
    DESCRIPTION = ("Find faces in an image batch (MTCNN, or SCRFD from an insightface pack) and cut two crops of "
                   "each: Face0's 160x160 margin crop for FaceNet and the 112x112 5-point aligned crop for "
                   "insightface recognisers. Outputs the faces, a preview with boxes and landmarks, a mask of "
                   "the face boxes and a text report.")
    CATEGORY = CATEGORY
    FUNCTION = "detect"
    RETURN_TYPES = (FACES, "IMAGE", "MASK", "IMAGE", "IMAGE", "STRING")
    RETURN_NAMES = ("faces", "preview", "mask", "crops_facenet", "crops_aligned", "report")
    OUTPUT_TOOLTIPS = (
        "The faces: both crops, boxes, landmarks, scores, source image index and the crop matrices (to paste back).",
        "The input images with each face's box, 5 landmarks and number/score drawn (red frame: no face).",
        "1 inside every detected face box, per input image (B, H, W).",
        "Face0's 160x160 margin crops (what FaceNet sees), one per face.",
        "The 112x112 five-point aligned crops (what insightface recognisers see), one per face.",
        "Faces found per image, and which images had none.",
    )

    @classmethod
    def VALIDATE_INPUTS(cls, margin_scale=None):  # NaN/inf, min/max of float widgets
        return finite_floats(cls, "FaceDetectCrop", margin_scale=margin_scale)

    @classmethod
    def INPUT_TYPES(cls):
        detectors = ["mtcnn", *insightface_choices("detection")]
        return {"required": {
            "image": ("IMAGE", {"tooltip": "Photos to find faces in (any size; RGBA and greyscale are accepted)."}),
            "detector": (detectors, {"default": "mtcnn", "tooltip":
                         "mtcnn: facenet-pytorch's MTCNN (weights ship with facenet-pytorch; Face0's detector). "
                         "PACK/FILE.onnx: the SCRFD detector of an insightface pack in models/insightface/models/."}),
            "select": (list(crop.SELECT_MODES), {"default": "largest", "tooltip":
                       "largest: only the largest face of each image (Face0's rule). all: every face, left to "
                       "right. index: the face_index-th face counted from the left."}),
            "face_index": ("INT", {"default": 0, "min": 0, "max": 63, "tooltip":
                           "With select=index: which face, 0 = leftmost. An image with fewer faces counts as "
                           "'no face'."}),
            "min_size": ("INT", {"default": 40, "min": 8, "max": 4096, "step": 1, "tooltip":
                         "Smallest face to keep, in pixels (longer side of the detector box)."}),
            "margin_scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 3.0, "step": 0.05, "tooltip":
                             "Face0's margins around the box for the FaceNet crop (10 px left/right, 33 top, 15 "
                             "bottom of the 160-px crop, scaled with the face). 1 = the paper, 0 = tight box."}),
            "upright": (list(crop.UPRIGHT_MODES), {"default": "rotate_if_no_face", "tooltip":
                        "rotate_if_no_face: if no face is found, try the image turned 90/270/180 degrees and crop "
                        "the face upright by its eye line (FaceChain). rotate_and_level: also level the eyes of "
                        "every FaceNet crop. off: detect as is."}),
            "no_face": (list(crop.NO_FACE_POLICIES), {"default": "error", "tooltip":
                        "What to do with an image without a face. error: stop and say which image. skip: drop "
                        "it (the report lists it). passthrough: use the whole image (centre square) as its face."}),
        }, "optional": {
            "preprocess": (list(detect.PREPROCESS_MODES), {"default": "facecond", "tooltip":
                           "facecond: the pack's resampling (the SCRFD input shrunk with INTER_AREA on floats, the "
                           "112 crop area-averaged before warping; fewer aliasing artefacts). insightface: "
                           "insightface's FaceAnalysis exactly: the det_size letterbox resized with cv2 "
                           "INTER_LINEAR on uint8, then the 112 ArcFace crop by one plain cv2.warpAffine of the "
                           "original image with the similarity transform to insightface's arcface_dst template "
                           "(norm_crop). Use it when the embedding "
                           "feeds a model trained on insightface embeddings (IP-Adapter FaceID). The detector "
                           "part applies to SCRFD only (mtcnn is not insightface's detector)."}),
        }}

    def detect(self, image, *, detector, select, face_index, min_size, margin_scale, upright, no_face,
               preprocess="facecond"):
        node = "FaceDetectCrop"
        imgs = image_to_numpy(image, node)
        b, h, w = imgs.shape[:3]
        det = _detector(detector, node)
        bar = Progress(b)
        if preprocess not in detect.PREPROCESS_MODES:
            raise ValueError(f"{node}: preprocess {preprocess!r} is not one of {list(detect.PREPROCESS_MODES)}; "
                             "pick facecond (the pack's default) or insightface (FaceAnalysis exactly).")
        per_image = crop.detect_faces(det, imgs * 255.0, min_size=min_size, select_mode=select,
                                      face_index=face_index, upright=upright, progress=lambda i: bar(i + 1),
                                      preprocess=preprocess)
        res = crop.crop_faces(imgs, per_image, no_face=no_face, margin_scale=margin_scale, detector_name=det.name,
                              node=node, min_size=min_size, select_mode=select, face_index=face_index,
                              preprocess=preprocess, dlib_chips=dlib_model("shape"))
        preview = np.stack([draw.draw_faces(imgs[i], res.per_image[i], missing=not per_image[i]) for i in range(b)])
        mask = np.stack([draw.face_mask(h, w, res.per_image[i]) for i in range(b)])
        log.info("[facecond] %s", res.report.splitlines()[0])  # the summary; every image's line at DEBUG
        log.debug("[facecond] %s", res.report.replace("\n", "; "))
        f = res.faces
        return (f, numpy_to_image(preview), numpy_to_image(mask), f.crops_facenet, f.crops_arcface, res.report)


class FacecondFaceEmbed:
    DESCRIPTION = ("Turn faces into identity embeddings: FaceNet Inception-ResNet-V1 (VGGFace2; Face0) on the "
                   "160x160 crops, or an insightface recogniser (ArcFace/CosFace ONNX, any width) on the "
                   "aligned 112x112 crops, via onnxruntime (CUDA when available, else CPU).")
    CATEGORY = CATEGORY
    FUNCTION = "embed"
    RETURN_TYPES = (FACE_EMBEDS,)
    RETURN_NAMES = ("face_embeds",)
    OUTPUT_TOOLTIPS = ("One embedding per face (N, D), with the model that made it and each face's source image.",)

    @classmethod
    def INPUT_TYPES(cls):
        models = recogniser_choices()
        return {"required": {
            "faces": (FACES, {"tooltip": "Faces from FaceDetectCrop."}),
            "model": (models, {"default": FACENET_MANIFEST, "tooltip":
                      "facenet_vggface2: Face0's embedder (models/facenet/20180402-114759-vggface2.pt, from the "
                      "weights manifest). facenet/FILE: another FaceNet state dict in models/facenet. "
                      "PACK/FILE.onnx: the recogniser of an insightface pack (antelopev2: glintr100.onnx, "
                      "buffalo_l: w600k_r50.onnx). dlib_resnet_v1: dlib's ResNet (128-d, an independent judge "
                      "for evaluation; pip install dlib-bin face-recognition-models) on dlib's own 150-px chips."}),
            "facenet_layer": (list(embed.FACENET_LAYERS), {"default": "bottleneck_512", "tooltip":
                              "FaceNet only. bottleneck_512: the 512-d layer before L2 normalisation (default; "
                              "Face0 drops the classifier). pooled_1792: the pooled features before the bottleneck."}),
            "normalize": (["auto", "l2", "none"], {"default": "auto", "tooltip":
                          "auto: FaceNet raw (as Face0 feeds its projection), insightface and dlib L2-normalised "
                          "(as insightface's normed_embedding). l2 / none: force it."}),
        }}

    def embed(self, faces: Faces, model: str, facenet_layer: str, normalize: str):
        node = "FaceEmbed"
        require_faces(node, "faces", faces)
        if len(faces) == 0:
            raise ValueError(f"{node}: input 'faces' holds no faces; check FaceDetectCrop's report.")
        progress = Progress(len(faces))
        if model == FACENET_MANIFEST or model.startswith("facenet/"):
            path = resolve_weight(FACENET_MANIFEST, node=node) if model == FACENET_MANIFEST else \
                verify_user_file("facenet", model[len("facenet/"):])
            fn = model_cache.load("facenet", path, embed.load_facenet, lambda f: f.net)
            device = model_cache.to_device(fn.net)
            vecs = fn.embed(faces.crops_facenet, facenet_layer, device=device, progress=progress)
            model_id, default_norm = embed.FaceNet.model_id(facenet_layer), False
        elif model == dlib_rec.MODEL_NAME:
            if faces.crops_dlib is None:
                dlib_files(node)  # dlib still missing: the install line
                raise ValueError(f"{node}: input 'faces' carries no dlib chips (dlib was not installed when "
                                 "FaceDetectCrop ran); run FaceDetectCrop again.")
            rec = dlib_model("resnet", node)
            vecs = rec.embed(faces.crops_dlib, progress=progress)
            model_id, default_norm = rec.model_id, True
        else:
            path = insightface_file(model, node, "model")
            kind = ifp.classify_file(path)
            if kind != "recognition":
                raise ValueError(f"{node}: {model} is a {kind} model, not a face recogniser; pick the pack's "
                                 "recognition model (112x112 input, e.g. glintr100.onnx or w600k_r50.onnx).")
            rec = model_cache.load("onnx-recogniser", path, lambda p: embed.load_onnx_recogniser(
                p, model_cache.onnx_session(p)), lambda r: r.session)
            model_cache.to_device(rec.session)
            vecs = rec.embed(faces.crops_arcface, progress=progress, exact=faces.preprocess == "insightface")
            model_id, default_norm = rec.model_id, True
        norm = default_norm if normalize == "auto" else normalize == "l2"
        if norm:
            vecs = embed.l2_normalize(vecs)
        return (FaceEmbeds(vecs.float().cpu(), model_id, norm, tuple(faces.source_index)),)


class FacecondFaceSimilarity:
    DESCRIPTION = ("Cosine similarity of every face in A with every face in B (or A with itself): a text table, "
                   "a heatmap image and the best score. Same person: high (about 0.6-0.8 with insightface "
                   "recognisers), different people: near 0.")
    CATEGORY = CATEGORY
    FUNCTION = "compare"
    RETURN_TYPES = ("STRING", "IMAGE", "FLOAT")
    RETURN_NAMES = ("table", "heatmap", "best")
    OUTPUT_TOOLTIPS = (
        "The cosine matrix as a text table (rows: A, columns: B; labels aROW(img SOURCE)).",
        "The matrix as an image: red/yellow similar, black unrelated, blue opposite.",
        "The highest cosine (A against itself: the highest between two different faces).",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "face_embeds_a": (FACE_EMBEDS, {"tooltip": "Rows of the matrix (e.g. reference photos)."}),
        }, "optional": {
            "face_embeds_b": (FACE_EMBEDS, {"tooltip": "Columns (e.g. generated images). Empty: A against A."}),
        }}

    def compare(self, face_embeds_a: FaceEmbeds, face_embeds_b: FaceEmbeds | None = None):
        node = "FaceSimilarity"
        same = face_embeds_b is None
        b = face_embeds_a if same else face_embeds_b
        require_embeds(node, "face_embeds_a", face_embeds_a, finite=False)
        require_embeds(node, "face_embeds_b", b, dim=face_embeds_a.dim, embedder=face_embeds_a.model,
                       against="face_embeds_a holds", fix="only embeddings of one model compare", finite=False)
        sim = similarity.cosine_matrix(face_embeds_a.embeds, b.embeds)
        rows = [f"a{i}(img{s})" for i, s in enumerate(face_embeds_a.source_index)]
        cols = [f"{'a' if same else 'b'}{i}(img{s})" for i, s in enumerate(b.source_index)]
        text = f"cosine similarity, model {face_embeds_a.model}\n" + similarity.table(sim, rows, cols)
        return (text, similarity.heatmap(sim), similarity.best_score(sim, same))


NODE_CLASS_MAPPINGS = {
    "FacecondFaceDetectCrop": FacecondFaceDetectCrop,
    "FacecondFaceEmbed": FacecondFaceEmbed,
    "FacecondFaceSimilarity": FacecondFaceSimilarity,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FacecondFaceDetectCrop": "FaceDetectCrop",
    "FacecondFaceEmbed": "FaceEmbed",
    "FacecondFaceSimilarity": "FaceSimilarity",
}
