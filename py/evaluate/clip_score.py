"""CLIP image-text cosine (the "CLIP score" of Livshits 2023 and the "text alignment" of Face0 2023) with a CLIP
model from a local folder in the transformers ``CLIPModel`` layout (config.json, model.safetensors, vocab.json,
merges.txt; e.g. openai/clip-vit-large-patch14 saved with ``save_pretrained``). Never touches a model hub.

CLIP: Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", 2021,
arXiv 2103.00020. The score is the raw cosine of the projected image and text embeddings (what the papers
report); Hessel et al.'s CLIPScore (arXiv 2104.08718) would be 2.5 · max(cosine, 0).

Images are prepared as CLIP's own processor does: shorter side resized to the model's input size (bicubic,
antialiased), centre crop, normalised with the mean/std of ``preprocessor_config.json`` (OpenAI's if absent).
"""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger("facecond")

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
REQUIRED_FILES = ("config.json", "vocab.json", "merges.txt")
BATCH = 16


def is_clip_folder(path: str | os.PathLike) -> bool:
    p = Path(path)
    weights = any(p.glob("*.safetensors")) or (p / "pytorch_model.bin").is_file()
    return weights and all((p / f).is_file() for f in REQUIRED_FILES)


def list_clip_folders(roots: list[str | os.PathLike]) -> list[str]:
    """Names of the CLIP model folders directly under each root (sorted, first root wins)."""
    names: list[str] = []
    for root in roots:
        if not os.path.isdir(root):
            continue
        for entry in sorted(os.listdir(root)):
            if entry not in names and is_clip_folder(os.path.join(root, entry)):
                names.append(entry)
    return names


class ClipScorer:
    """A CLIPModel + tokenizer from ``folder``; ``cosines(images, texts)`` gives one cosine per image."""

    def __init__(self, folder: str | os.PathLike, device: torch.device | str = "cpu"):
        folder = Path(folder)
        missing = [f for f in REQUIRED_FILES if not (folder / f).is_file()]
        if missing or not is_clip_folder(folder):
            raise FileNotFoundError(f"{folder} is not a CLIP model folder (missing {missing or 'the weights'}); "
                                    "it needs config.json, model.safetensors (or pytorch_model.bin), vocab.json and "
                                    "merges.txt, as CLIPModel.save_pretrained + the tokenizer write them.")
        try:
            from transformers import CLIPModel, CLIPTokenizer
        except ImportError as e:  # transformers comes with ComfyUI; say so if a bare env lacks it
            raise RuntimeError("CLIP score needs the transformers package: pip install transformers") from e
        self.folder = folder
        self.model = CLIPModel.from_pretrained(str(folder), local_files_only=True).eval().to(torch.device(device))
        self.tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
        vc = self.model.config.vision_config
        self.size = int(vc.image_size)
        self.mean, self.std = OPENAI_MEAN, OPENAI_STD
        pre = folder / "preprocessor_config.json"
        if pre.is_file():
            cfg = json.loads(pre.read_text())
            self.mean = tuple(cfg.get("image_mean", self.mean))
            self.std = tuple(cfg.get("image_std", self.std))
        self.max_tokens = int(self.model.config.text_config.max_position_embeddings)

    @property
    def device(self) -> torch.device:
        """Where the model is now (a model manager may have moved it since)."""
        return next(self.model.parameters()).device

    @property
    def model_id(self) -> str:
        return f"clip/{self.folder.name}"

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) in [0, 1] -> (B, 3, S, S) normalised CLIP input."""
        x = images.float().permute(0, 3, 1, 2)
        h, w = x.shape[-2:]
        scale = self.size / min(h, w)
        nh, nw = max(self.size, round(h * scale)), max(self.size, round(w * scale))
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        top, left = (nh - self.size) // 2, (nw - self.size) // 2
        x = x[..., top:top + self.size, left:left + self.size]
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(0, images.shape[0], BATCH):
            px = self.preprocess(images[i:i + BATCH]).to(self.device)
            feats = self.model.get_image_features(pixel_values=px)
            out.append(getattr(feats, "pooler_output", feats).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.model.config.projection_dim)

    @torch.no_grad()
    def text_embeds(self, texts: list[str]) -> torch.Tensor:
        tok = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_tokens,
                             return_tensors="pt").to(self.device)
        feats = self.model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
        return getattr(feats, "pooler_output", feats).float().cpu()

    def cosines(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """(B, H, W, 3) images and B texts (image i with text i) -> (B,) float64 cosines."""
        if images.shape[0] != len(texts):
            raise ValueError(f"CLIP score: {images.shape[0]} image(s) but {len(texts)} text(s)")
        unique = list(OrderedDict.fromkeys(texts))
        t = self.text_embeds(unique)
        idx = torch.tensor([unique.index(s) for s in texts])
        img = self.image_embeds(images)
        return (F.normalize(img.double(), dim=1) * F.normalize(t.double()[idx], dim=1)).sum(1)


def load_clip_scorer(folder: str | os.PathLike, device: torch.device | str = "cpu") -> ClipScorer:
    """A ClipScorer for a transformers-layout folder (no cache here: the CLIPScore node keeps it in the pack's
    model cache, ``nodes/model_cache.py``)."""
    return ClipScorer(Path(folder).resolve(), device)




def prompts_for(texts: list[str], n_images: int, who: str = "CLIP score") -> list[str]:
    """One prompt per image: a single prompt for all; k prompts for k·m images as consecutive blocks of m."""
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError(f"{who}: no prompt given; write one prompt per line.")
    if len(texts) == 1:
        return texts * n_images
    if n_images % len(texts):
        raise ValueError(f"{who}: {len(texts)} prompts for {n_images} images; give 1 prompt, or k prompts for "
                         "a batch of k·m images (the m images of each prompt consecutive).")
    m = n_images // len(texts)
    return [t for t in texts for _ in range(m)]
