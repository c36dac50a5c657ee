"""Pseudo-words in a cloned CLIP: how Celeb Basis and face textual inversion put a person into prompts.

How a pseudo-word gets into a CLIP without touching the input CLIP or any ComfyUI function: ``clip.clone()``
gets a *new tokenizer object* (``PseudoWordTokenizer``) around a shallow copy of the original one whose
text-encoder tokenizer has one extra embedding folder. The pseudo-word's vectors are written there as a
standard ComfyUI embedding file (content-addressed: ``facecond_pw_<sha>.safetensors``), and every
occurrence of the word in a prompt becomes ComfyUI's own ``embedding:facecond_pw_<sha>`` syntax, which
``sd1_clip`` resolves as it does for any textual-inversion embedding. So weights ``(<alice>:1.2)``, long
prompts and every text node behave as for ordinary embeddings, and the word's vectors enter the text encoder
only at its own token positions.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import re
from dataclasses import dataclass

import folder_paths
import torch

from ...py.weights.atomic import save_file

log = logging.getLogger("facecond")

WORD_RE = re.compile(r"^(<[A-Za-z][A-Za-z0-9_\-]{0,31}>|[A-Za-z][A-Za-z0-9_]{1,31})$")


@dataclass
class TextEncoder:
    module: object  # sd1_clip.SDClipModel
    tokenizer: object  # sd1_clip.SDTokenizer
    key: str  # e.g. "clip_l", "clip_h": the embedding-file key

    def table(self) -> torch.Tensor:
        return self.module.transformer.get_input_embeddings().weight

    def tokenize(self, text: str) -> list[int]:
        ids = self.tokenizer.tokenizer(text)["input_ids"]
        return ids[self.tokenizer.tokens_start:-1 if self.tokenizer.tokenizer_adds_end_token else None]


FAMILIES = {("clip_l",): "SD1.x", ("clip_h",): "SD2.x", ("clip_l", "clip_g"): "SDXL", ("clip_g",): "SDXL refiner"}


def family_of(keys: tuple[str, ...]) -> str:
    """The model family of a text-encoder layout, as saved coefficients and MLPs record it."""
    return FAMILIES.get(tuple(keys), "+".join(keys))


@dataclass
class TextEncoders:
    """The CLIP text encoder(s) a pseudo-word lives in: one (SD1.x CLIP-L, SD2.x OpenCLIP-H) or two (SDXL: CLIP-L
    and CLIP-G, one BPE vocabulary). A pseudo-word's vectors are the encoders' parts side by side, (K, sum of d):
    SDXL (K, 768 + 1280)."""

    parts: tuple[TextEncoder, ...]

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(e.key for e in self.parts)

    @property
    def key(self) -> str:  # one text encoder: its embedding key (the content hash of pseudo-word files uses it)
        return "+".join(self.keys)

    @property
    def dims(self) -> tuple[int, ...]:
        return tuple(int(e.table().shape[1]) for e in self.parts)

    @property
    def family(self) -> str:
        return family_of(self.keys)

    def tables(self) -> list[torch.Tensor]:
        return [e.table() for e in self.parts]

    def table(self) -> torch.Tensor:
        """The single encoder's token table (one-encoder models; see ``tables``)."""
        if len(self.parts) != 1:
            raise ValueError(f"{self.family}: {len(self.parts)} token tables; use tables()")
        return self.parts[0].table()

    def tokenize(self, text: str) -> list[int]:
        return self.parts[0].tokenize(text)

    def split(self, vectors: torch.Tensor) -> dict[str, torch.Tensor]:
        """(K, sum of d) -> {embedding key: (K, d)}: what an embedding file holds for these encoders."""
        return dict(zip(self.keys, torch.split(vectors, self.dims, dim=-1), strict=True))


def _base_tokenizer(clip):
    tok = clip.tokenizer
    return tok.inner if isinstance(tok, PseudoWordTokenizer) else tok


def _sdxl_clip() -> type:
    from comfy import sdxl_clip

    return sdxl_clip.SDXLClipModel


def text_encoder(clip, node: str) -> TextEncoders:
    """The CLIP text encoder(s) of an SD1.x / SD2.x CLIP (one) or an SDXL CLIP (CLIP-L + CLIP-G); ValueError for
    other text encoders (SD3's T5, Flux's ...)."""
    if clip is None:
        raise ValueError(f"{node}: clip is None (the checkpoint has no text encoder); load one with CLIPLoader.")
    cond, tok = clip.cond_stage_model, _base_tokenizer(clip)
    if isinstance(cond, _sdxl_clip()):
        keys = ("clip_l", "clip_g")
    else:
        key = getattr(cond, "clip", None)
        keys = (key,) if isinstance(key, str) else ()
    if not keys or any(getattr(tok, k, None) is None or not hasattr(cond, k) for k in keys) \
            or (len(keys) == 1 and getattr(tok, "clip", None) != keys[0]):
        raise ValueError(f"{node}: this CLIP ({type(cond).__name__}) is neither one CLIP text encoder (SD1.x, SD2.x) "
                         "nor SDXL's CLIP-L + CLIP-G; Celeb Basis and face textual inversion support those (SD3 and "
                         "Flux encode with T5 as well, which a token-table pseudo-word does not reach).")
    parts = tuple(TextEncoder(getattr(cond, k), getattr(tok, k), getattr(tok, k).embedding_key) for k in keys)
    if len({int(e.table().shape[0]) for e in parts}) != 1:
        raise ValueError(f"{node}: the text encoders of this CLIP have different vocabularies "
                         f"({[int(e.table().shape[0]) for e in parts]}); they must share one tokenizer.")
    return TextEncoders(parts)


# --- pseudo-words ------------------------------------------------------------------------------------------
def _word_dir() -> str:
    return os.path.join(folder_paths.get_temp_directory(), "facecond_pseudowords")


def embedding_file_name(vectors: torch.Tensor, key: str) -> str:
    """Content address of a pseudo-word file: ``key`` is the encoders' keys joined by '+' ("clip_l",
    "clip_l+clip_g"), ``vectors`` the (K, sum of d) vectors."""
    data = vectors.detach().cpu().float().contiguous().numpy().tobytes()
    return f"facecond_pw_{hashlib.sha256(key.encode() + data).hexdigest()[:20]}"


class PseudoWordTokenizer:
    """A CLIP tokenizer that turns registered pseudo-words into ComfyUI ``embedding:`` references (see top).

    ``inner``: a shallow copy of the original tokenizer whose text-encoder tokenizer(s) (SDXL: both ``clip_l`` and
    ``clip_g``) also search the pack's pseudo-word folder. A word's file holds one tensor per encoder (SDXL:
    ``clip_l`` (K, 768) and ``clip_g`` (K, 1280), the layout of any SDXL embedding), so each sub-tokenizer reads
    its own half. Everything else is delegated to ``inner``."""

    def __init__(self, inner, enc: TextEncoders, words: dict[str, torch.Tensor]):
        self.inner, self.enc, self.words = inner, enc, dict(words)
        self.key = enc.key
        self._names = {w: embedding_file_name(v, self.key) for w, v in self.words.items()}

    @classmethod
    def extend(cls, clip, enc: TextEncoders, word: str, vectors: torch.Tensor) -> PseudoWordTokenizer:
        tok = clip.tokenizer
        if isinstance(tok, PseudoWordTokenizer):
            return cls(tok.inner, tok.enc, {**tok.words, word: vectors})
        inner = copy.copy(tok)
        for key in enc.keys:
            sub = copy.copy(getattr(tok, key))
            dirs = sub.embedding_directory
            dirs = [] if dirs is None else [dirs] if isinstance(dirs, str) else list(dirs)
            sub.embedding_directory = [_word_dir(), *dirs]
            setattr(inner, key, sub)
        return cls(inner, enc, {word: vectors})

    def _ensure_files(self) -> None:
        folder = _word_dir()
        os.makedirs(folder, exist_ok=True)
        for word, name in self._names.items():
            path = os.path.join(folder, name + ".safetensors")
            if not os.path.isfile(path):
                parts = self.enc.split(self.words[word])
                save_file({k: v.detach().cpu().float().contiguous() for k, v in parts.items()}, path)

    def expand(self, text: str) -> str:
        for word, name in self._names.items():
            text = re.sub(word_pattern(word), f" embedding:{name} ", text)
        return text

    def tokenize_with_weights(self, text: str, return_word_ids=False, **kwargs):
        self._ensure_files()
        return self.inner.tokenize_with_weights(self.expand(text), return_word_ids, **kwargs)

    def untokenize(self, token_weight_pair):
        return self.inner.untokenize(token_weight_pair)

    def state_dict(self):
        return self.inner.state_dict()

    def __getattr__(self, name):  # clip_l, clip_name, ... of the wrapped tokenizer
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


def word_pattern(word: str) -> str:
    """Regex for a pseudo-word in a prompt: <name> literally; a bare word only as a whole word."""
    return re.escape(word) if word.startswith("<") else rf"(?<![\w<]){re.escape(word)}(?![\w>])"


def check_word(word: str, clip, enc: TextEncoders, node: str) -> str:
    """The pseudo-word, checked: syntax, no clash with a real token, not used yet in this CLIP."""
    word = word.strip()
    if not WORD_RE.match(word):
        raise ValueError(f"{node}: pseudo_word {word!r} is not a pseudo-word. Write it as <name> (letters, digits, "
                         "_ or -, starting with a letter, at most 32 characters), e.g. <alice>.")
    if not word.startswith("<") and len(enc.tokenize(word)) == 1:
        raise ValueError(f"{node}: pseudo_word {word!r} collides with the real token '{word.lower()}' of the "
                         f"tokenizer, so prompts could not tell them apart. Use <{word}> or a made-up word.")
    tok = clip.tokenizer
    if isinstance(tok, PseudoWordTokenizer):
        for other in tok.words:
            if re.search(word_pattern(word), other) or re.search(word_pattern(other), word):
                raise ValueError(f"{node}: pseudo_word {word} is already used (or overlaps {other}) in this CLIP; "
                                 "give every identity its own word.")
    return word


def add_pseudo_word(clip, word: str, vectors: torch.Tensor, node: str):
    """A clone of ``clip`` in which ``word`` is the (K, d) token embeddings ``vectors`` (SDXL: (K, 768 + 1280),
    CLIP-L's part first); the input is untouched."""
    enc = text_encoder(clip, node)
    word = check_word(word, clip, enc, node)
    d = sum(enc.dims)
    if vectors.ndim != 2 or vectors.shape[1] != d:
        raise ValueError(f"{node}: the pseudo-word vectors are {tuple(vectors.shape)}; this text encoder needs "
                         f"(K, {d}){' (CLIP-L + CLIP-G: 768 + 1280)' if len(enc.dims) > 1 else ''}.")
    out = clip.clone()
    out.tokenizer = PseudoWordTokenizer.extend(clip, enc, word, vectors.detach().cpu().float().clone())
    return out
