"""The face crop IP-Adapter FaceID Plus / Plus v2 hands to the CLIP image encoder, made as the authors' reference
code makes it (h94/IP-Adapter-FaceID model card; tencent-ailab/IP-Adapter ``ip_adapter_faceid.py`` usage):

    faces = app.get(image)                                  # insightface FaceAnalysis: 5 keypoints per face
    face_image = face_align.norm_crop(image, landmark=faces[0].kps, image_size=224)

``norm_crop`` aligns the 5 keypoints to the ArcFace template scaled to 224 (similarity transform, skimage's
estimate on float32 keypoints: ``align.norm_crop_matrix``, bit for bit) and warps the uint8 image with one
``cv2.warpAffine`` (bilinear, black outside). The CLIP processor then sees a 224 x 224 square: its resize and
centre crop leave it as it is.

One deviation, deliberate: the authors' snippets crop the BGR array OpenCV/insightface work in and hand it to CLIP
unconverted; ComfyUI images are RGB and the crop stays RGB here (as in IPAdapter_plus). The unconditional input is a
zero image *after* CLIP's normalisation (``torch.zeros_like(clip_image)`` in ``get_image_embeds``): in pixel terms,
an image of CLIP's mean colour (``mean_image``).
"""

from __future__ import annotations

import numpy as np
import torch

from ..faces.align import norm_crop, norm_crop_matrix

CLIP_CROP = 224  # image_size=224 in the reference


def clip_face_crops(images: torch.Tensor, landmarks: np.ndarray, source_index, size: int = CLIP_CROP) -> torch.Tensor:
    """(B, H, W, 3) images in [0, 1] (ComfyUI IMAGE), (N, 5, 2) keypoints in source pixels and each face's image
    index -> (N, size, size, 3) aligned crops in [0, 1] (uint8 steps, as insightface crops the uint8 image)."""
    out = []
    for kps, i in zip(np.asarray(landmarks, np.float32), source_index):
        img = (images[int(i)].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        out.append(norm_crop(img, norm_crop_matrix(kps, size), size))
    if not out:
        return torch.zeros(0, size, size, 3)
    return torch.from_numpy(np.stack(out)).float() / 255.0


def mean_image(mean, size: int = CLIP_CROP) -> torch.Tensor:
    """(1, size, size, 3) image of CLIP's mean colour: zeros once CLIP normalises it (the reference's uncond input)."""
    return torch.tensor(mean, dtype=torch.float32).reshape(1, 1, 1, 3).expand(1, size, size, 3).contiguous()
