"""A random-weight CLIP ViT-H/14 image encoder that ComfyUI's CLIPVisionLoader loads, for workflow tests.

CLIPVisionLoader (``comfy.clip_vision.load_clipvision_from_sd``) picks a fixed full-size config from the keys a file
holds (``vision_model.encoder.layers.30.*``: ViT-H, 32 layers of 1280; ``.22.``: ViT-L; ``.47.``: ViT-bigG) and
builds that model whatever the file's sizes: a smaller random encoder cannot pass through it, and a file with only
some keys leaves the rest uninitialised. So the stand-in is a whole ViT-H (the encoder FaceID Plus v2 was trained
with): 632M parameters, written once in float16 (1.26 GB) into the host cache, keys and shapes from ComfyUI's own
``clip_vision_config_h.json`` through transformers' ``CLIPVisionModelWithProjection`` on the meta device.
"""

from __future__ import annotations

import json
from pathlib import Path

from .host import comfy_dir

NAME = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"  # the name IP-Adapter users have in models/clip_vision


def write_random_vit_h(path: Path, seed: int = 0, comfy_root=None) -> Path:
    """Write (once) a seeded random ViT-H image encoder to ``path``; returns ``path``."""
    path = Path(path)
    if path.is_file():
        return path
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = json.loads((comfy_dir(comfy_root) / "comfy" / "clip_vision_config_h.json").read_text())
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in CLIPVisionModelWithProjection(CLIPVisionConfig(**cfg)).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in shapes.items():
        if "norm" in k and k.endswith("weight"):
            sd[k] = torch.ones(shape, dtype=torch.float16)
        elif k.endswith("bias"):
            sd[k] = torch.zeros(shape, dtype=torch.float16)
        else:
            sd[k] = (torch.randn(shape, generator=g) * 0.02).half()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(sd, str(tmp))
    tmp.replace(path)
    return path
