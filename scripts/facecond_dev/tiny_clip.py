"""A tiny random-weight CLIP model in the real transformers ``CLIPModel`` folder layout, for tests and benches.

config.json + model.safetensors from ``save_pretrained``, and the CLIP BPE tokenizer files (vocab.json,
merges.txt, ...) that ship inside ComfyUI (``comfy/sd1_tokenizer``): the same files a real ViT-L/14 folder has.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .host import comfy_dir


def write_tiny_clip(folder: Path, seed: int = 0, comfy_root=None) -> Path:
    """Write (once) a seeded ~0.5M-parameter CLIPModel into ``folder``; returns the folder."""
    folder = Path(folder)
    if (folder / "model.safetensors").is_file():
        return folder
    import torch
    from transformers import CLIPConfig, CLIPModel

    text = {"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "max_position_embeddings": 77, "bos_token_id": 49406, "eos_token_id": 49407,
            "pad_token_id": 49407}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    tok = comfy_dir(comfy_root) / "comfy" / "sd1_tokenizer"
    for f in tok.iterdir():
        shutil.copyfile(f, folder / f.name)
    return folder
