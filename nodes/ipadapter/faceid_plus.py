"""IPAdapterEncode for IP-Adapter FaceID Plus / Plus v2: the face embeddings (FaceEmbed) beside the CLIP penultimate
hidden states of each face's aligned 224 crop (``py/ipadapter/face_crop.py``, cut from the photo with the keypoints
FaceDetectCrop found), and those of CLIP's unconditional (mean-colour) image, through ComfyUI's CLIP_VISION
(``clip_vision.encode_image(...)["penultimate_hidden_states"]``)."""

from __future__ import annotations

import torch

from ...py.faces.types import Faces
from ...py.ipadapter import aggregate as agg
from ...py.ipadapter import face_crop
from ..common import require_embeds


def encode_face_and_clip(node: str, adapter, image, clip_vision, face_embeds, faces, notes: list) -> agg.RefEmbeds:
    v = adapter.variant
    if face_embeds is None or faces is None or image is None or clip_vision is None:
        raise ValueError(f"{node}: {adapter.name} is a {v.title} IP-Adapter: connect face_embeds (FaceEmbed), faces "
                         "(the FaceDetectCrop output FaceEmbed read: its keypoints cut the face crop for CLIP), image "
                         "(the photos FaceDetectCrop got) and clip_vision (CLIPVisionLoader, CLIP-ViT-H-14).")
    x = require_embeds(node, "face_embeds", face_embeds, dim=v.input_dim, against=f"{adapter.name} takes",
                       fix="FaceID Plus: insightface buffalo_l, 512-d", allow_empty=True, finite=False)
    if not isinstance(faces, Faces):
        raise ValueError(f"{node}: input 'faces' must be FACES from FaceDetectCrop (got {type(faces).__name__}).")
    if len(faces) != x.shape[0] or tuple(faces.source_index) != tuple(face_embeds.source_index):
        raise ValueError(f"{node}: faces ({len(faces)} faces, images {list(faces.source_index)}) are not the faces "
                         f"face_embeds were made from ({x.shape[0]} rows, images {list(face_embeds.source_index)}). "
                         "Connect the same FaceDetectCrop output to FaceEmbed and to faces.")
    if faces.image_size != tuple(image.shape[1:3]) or max(faces.source_index, default=-1) >= image.shape[0]:
        raise ValueError(f"{node}: image ({image.shape[0]} of {tuple(image.shape[1:3])}) is not the batch the faces "
                         f"were found in ({faces.num_images} of {tuple(faces.image_size)}). Connect the image "
                         "FaceDetectCrop got.")
    src = tuple(faces.source_index)
    missing = sorted(set(range(max(src, default=-1) + 1)) - set(src))
    if missing:
        notes.append(f"images {missing} had no usable face (skipped by FaceDetectCrop)")
    crops = face_crop.clip_face_crops(image, faces.landmarks, src)
    mean = getattr(clip_vision, "image_mean", [0.48145466, 0.4578275, 0.40821073])
    with torch.no_grad():
        hidden = clip_vision.encode_image(crops, crop=False)["penultimate_hidden_states"].float().cpu() \
            if len(crops) else torch.zeros(0, 1, v.clip_dim)
        neg = clip_vision.encode_image(face_crop.mean_image(mean), crop=False)["penultimate_hidden_states"]
    if neg.shape[-1] != v.clip_dim:
        raise ValueError(f"{node}: clip_vision gives {neg.shape[-1]}-d hidden states but {adapter.name} reads "
                         f"{v.clip_dim}-d ones. Load the CLIP vision model it was trained with (CLIP-ViT-H-14, "
                         "1280-d) in CLIPVisionLoader.")
    return agg.RefEmbeds(x.cpu(), v.input_kind, f"{face_embeds.model}+clip_vision/face_crop", src, tuple(notes),
                         clip=hidden, clip_neg=neg.float().cpu())
