"""What ``scripts/demo.py`` puts in place so any example workflow runs on a machine with nothing but the package
registries: the real weights a prompt names (and which are missing), stand-ins for the missing ones, the photo,
and the demo size.

Stand-ins, each written into the demo's throw-away base under the name the workflow asks for:

- checkpoint: the tiny random SD1.5 (``tiny_model.py``; its TAESD from ../shared/data when there, else random)
- Face0 projection: an untrained one for 128-d embeddings (embedder ``any``: it takes any 128-d recogniser's)
- FaceEmbed: a recogniser whose weights ship on PyPI (dlib's ResNet: ``dlib-bin`` + ``face-recognition-models``),
  else the insightface test pack from ../shared/data; FaceDetectCrop: MTCNN (weights ship in facenet-pytorch)
- IP-Adapter FaceID (128-d, sized for the tiny U-Net's cross-attentions, with a FaceID LoRA), LoRAs (rank 4 on
  the tiny U-Net's attentions), genderage.onnx, inswapper (random, as the tests make them)

The photo: scikit-image's ``astronaut()`` (Eileen Collins, NASA; public domain, scikit-image's
data/README.txt: "No known copyright restrictions, released into the public domain"), mirrored for a second
photo and side by side for the two-person one.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger("facecond.demo")

STAND_IN_DIM = 128  # dlib's ResNet and the test pack's MobileFaceNet both give 128-d embeddings
DLIB = "dlib_resnet_v1"
FACENET = "facenet_vggface2"
FACENET_FILE = "20180402-114759-vggface2.pt"
# Demo size: 64 px latents, 2 steps for every sampler and trainer (on 2 CPU cores a whole example takes seconds).
DEMO_SIZE = {"EmptyLatentImage": {"width": 64, "height": 64}, "KSampler": {"steps": 2},
             "FacecondThreeWayCFGSampler": {"steps": 2},
             "FacecondTrainCelebBasis": {"steps": 2, "resolution": 64},
             "FacecondTrainFaceTI": {"steps": 2, "resolution": 64},
             "FacecondFaceFusion": {"steps": 2, "resolution": 64},
             "FacecondFaceChainPreprocess": {"resolution": 64},
             "TrainLoraNode": {"steps": 2, "rank": 4, "training_dtype": "fp32", "lora_dtype": "fp32",
                               "gradient_checkpointing": False}}


@dataclass
class Need:
    """One real weight file a prompt names: ``folder`` is the models sub-folder it belongs in."""
    node: str
    class_type: str
    input: str
    folder: str
    name: str
    what: str

    @property
    def relpath(self) -> str:
        return f"{self.folder}/{self.name}"


def _onnx(what: str):
    return lambda v: ("insightface/models", v, what) if v.endswith(".onnx") else None


# class_type -> (input, value -> (folder, file, what) or None when nothing is needed)
_READS = {
    "CheckpointLoaderSimple": ("ckpt_name", lambda v: ("checkpoints", v, "Stable Diffusion 1.5 checkpoint")),
    "LoraLoader": ("lora_name", lambda v: ("loras", v, "SD1.5 LoRA")),
    "FacecondLoadFace0Projection": ("projection_name", lambda v: (
        "facecond/face0", v, "Face0 projection (no public weights: train one, README 'Face0')")),
    "FacecondLoadIPAdapter": ("ipadapter_name", lambda v: ("ipadapter", v, "IP-Adapter (h94/IP-Adapter-FaceID)")),
    "FacecondFaceEmbed": ("model", lambda v: ("facenet", FACENET_FILE, "FaceNet VGGFace2 (downloaded at first use)")
                          if v == FACENET else _onnx("insightface recogniser")(v)),
    "FacecondFaceDetectCrop": ("detector", _onnx("insightface detector (SCRFD)")),
    "FacecondFaceChainTagFaces": ("genderage_model", _onnx("insightface genderage (buffalo_l)")),
    "FacecondFaceFusion": ("swap_model", lambda v: None if v == "none" else ("insightface", v, "face-swap model")),
}


def needs(prompt: dict) -> list[Need]:
    """The real weight files an API prompt reads (MTCNN and dlib's ResNet ship in packages: not listed)."""
    out = []
    for node_id, node in sorted(prompt.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else 0):
        spec = _READS.get(node["class_type"])
        value = node["inputs"].get(spec[0]) if spec else None
        if not isinstance(value, str) or not (got := spec[1](value)):
            continue
        folder, name, what = got
        out.append(Need(node_id, node["class_type"], spec[0], folder, name, what))
    return out


def find(need: Need, roots: list[Path]) -> Path | None:
    """The file of ``need`` under the first models root that has it."""
    for root in roots:
        path = root / need.folder / need.name
        if path.is_file():
            return path
    return None


def pack_py() -> None:
    """The pack's torch-only ``py`` package importable as ``facecond.py`` without its ComfyUI nodes."""
    import sys
    import types

    if "facecond" not in sys.modules:
        pkg = types.ModuleType("facecond")
        pkg.__path__ = [str(Path(__file__).resolve().parents[2])]
        sys.modules["facecond"] = pkg


# --- the photo -------------------------------------------------------------------------------------------------
def write_photos(base: Path, names: list[str], given: list[Path]) -> dict[str, Path]:
    """The workflow's LoadImage files in ``base/input``: the given photos in turn, else the astronaut (mirrored
    for every second name; side by side for a name with 'two'), so two-photo graphs get two differing faces."""
    from PIL import Image

    inp = base / "input"
    out = {}
    if given:
        for i, name in enumerate(names):
            out[name] = given[i % len(given)]
            Image.open(given[i % len(given)]).convert("RGB").save(inp / name)
        return out
    from skimage.data import astronaut

    photo = Image.fromarray(astronaut())
    for i, name in enumerate(names):
        img = photo.transpose(Image.FLIP_LEFT_RIGHT) if i % 2 else photo
        if "two" in name:
            img = Image.new("RGB", (1024, 512))
            img.paste(photo, (0, 0))
            img.paste(photo.transpose(Image.FLIP_LEFT_RIGHT), (512, 0))
        img.save(inp / name)
        out[name] = inp / name
    return out


# --- stand-ins ---------------------------------------------------------------------------------------------------
def pick_recogniser(object_info: dict, facenet_here: bool) -> str | None:
    """The FaceEmbed choice that runs here: FaceNet when its file is in place, else dlib's ResNet (PyPI weights),
    else the test pack's recogniser, else None."""
    choices = object_info["FacecondFaceEmbed"]["input"]["required"]["model"][0]
    if facenet_here:
        return FACENET
    for name in (DLIB, "testpack/mobilefacenet_128.onnx"):
        if name in choices:
            return name
    return None


def _unet_attention_keys(ckpt: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(ckpt), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()
                if k.startswith("model.diffusion_model.") and ".attn" in k}


def write_lora(path: Path, ckpt: Path, seed: int) -> None:
    """Rank-4 LoRA on every attention projection of the checkpoint's U-Net (as the FaceChain tests make them)."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in sorted(_unet_attention_keys(ckpt).items()):
        if k.endswith((".to_q.weight", ".to_k.weight", ".to_v.weight")):
            stem = k[len("model."):-len(".weight")]
            out[f"{stem}.lora_down.weight"] = torch.randn(4, shape[1], generator=g) * 0.1
            out[f"{stem}.lora_up.weight"] = torch.randn(shape[0], 4, generator=g) * 0.1
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path))


def write_ipadapter_faceid(path: Path, ckpt: Path) -> None:
    """A random FaceID IP-Adapter for 128-d embeddings in the real nested .bin layout, one adapter per cross-
    attention of the checkpoint in IP-Adapter order (input, output, middle blocks), with a rank-8 FaceID LoRA."""
    import re

    import torch

    from .random_weights import random_state_dict

    order = {"input_blocks": 0, "output_blocks": 1, "middle_block": 2}
    layers = []
    for k, shape in _unet_attention_keys(ckpt).items():
        m = re.match(r"model\.diffusion_model\.(input_blocks|output_blocks|middle_block)\.(\d+)\..*"
                     r"transformer_blocks\.(\d+)\.attn2\.to_k\.weight$", k)
        if m:
            layers.append(((order[m[1]], int(m[2]), int(m[3])), shape))
    layers.sort()
    flat = random_state_dict("faceid", STAND_IN_DIM, [s[0] for _, s in layers], cross_dim=layers[0][1][1], seed=3,
                             scale=0.5, lora_rank=8)
    nested = {part: {k[len(part) + 1:]: v for k, v in flat.items() if k.startswith(part + ".")}
              for part in ("image_proj", "ip_adapter")}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(nested, path)


def write_projection(path: Path) -> None:
    """An untrained Face0 projection for any 128-d embedder (SD1.5 context)."""
    pack_py()
    from facecond.py.face0.projection import ProjectionInfo, random_projection, save_projection

    info = ProjectionInfo(embedder="any", embed_dim=STAND_IN_DIM, base_model="sd1",
                          extra={"note": "untrained stand-in for the demo"})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_projection(random_projection(info, seed=0), path)


STAND_IN_PACK = "demo_standin"  # insightface-folder stand-ins get their own name: the real ones are sha256-pinned


def write_stand_in(need: Need, base: Path, ckpt: Path, prompt: dict) -> str:
    """Write the stand-in for ``need`` into ``base/models`` (under its name, or under ``STAND_IN_PACK`` with the
    prompt switched to it where the real file's hash is pinned); what it is, for the log."""
    path = base / "models" / need.folder / need.name
    if need.folder == "checkpoints":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(ckpt)
        return "the tiny random SD1.5 checkpoint"
    if need.folder == "loras":
        write_lora(path, ckpt, seed=sum(map(ord, need.name)))
        return "a random rank-4 LoRA"
    if need.folder == "ipadapter":
        write_ipadapter_faceid(path, ckpt)
        return "a random 128-d FaceID IP-Adapter"
    if need.folder == "facecond/face0":
        write_projection(path)
        return "an untrained 128-d Face0 projection"
    if need.class_type == "FacecondFaceChainTagFaces":
        from .onnx_standins import genderage_model

        value = f"{STAND_IN_PACK}/genderage.onnx"
        genderage_model(base / "models" / "insightface" / "models" / value, 0.1, 0.9, 52)
        prompt[need.node]["inputs"][need.input] = value
        return f"{value}: a constant genderage model (male, 52)"
    if need.class_type == "FacecondFaceFusion":
        from .stand_in_swap import write_stand_in as write_swap

        value = f"{STAND_IN_PACK}_inswapper.onnx"
        write_swap(base / "models" / "insightface" / value, embed_dim=STAND_IN_DIM)
        prompt[need.node]["inputs"][need.input] = value
        return f"{value}: a random inswapper-format model"
    return "no stand-in"


def switch_face_model(prompt: dict, need: Need, recogniser: str) -> str:
    """A missing FaceEmbed model -> ``recogniser``, a missing insightface detector -> MTCNN (both run on weights
    that ship in packages); what changed, for the log. Changes ``prompt`` in place (the demo's own copy)."""
    replacement = recogniser if need.class_type == "FacecondFaceEmbed" else "mtcnn"
    prompt[need.node]["inputs"][need.input] = replacement
    return f"{replacement} instead"


def demo_size(prompt: dict) -> list[str]:
    """Cut every sampler, trainer and image size to ``DEMO_SIZE``; the changes, for the log."""
    changed = []
    for node in prompt.values():
        for key, value in DEMO_SIZE.get(node["class_type"], {}).items():
            if key in node["inputs"] and node["inputs"][key] != value:
                changed.append(f"{node['class_type']} {key} {node['inputs'][key]} -> {value}")
                node["inputs"][key] = value
    return changed


def dump(prompt: dict) -> str:
    return json.dumps(prompt, indent=1)


def image_stats(path: Path) -> str:
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), np.float32)
        return f"{im.width}x{im.height}, pixel std {arr.std():.0f}"
