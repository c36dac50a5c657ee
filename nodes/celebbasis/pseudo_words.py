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


def _base_tokenizer(clip):
    tok = clip.tokenizer
    return tok.inner if isinstance(tok, PseudoWordTokenizer) else tok


def text_encoder(clip, node: str) -> TextEncoder:
    """The single CLIP text encoder of an SD1.x/SD2.x CLIP; ValueError for two-encoder models (SDXL)."""
    if clip is None:
        raise ValueError(f"{node}: clip is None (the checkpoint has no text encoder); load one with CLIPLoader.")
    cond, tok = clip.cond_stage_model, _base_tokenizer(clip)
    key = getattr(cond, "clip", None)
    if not isinstance(key, str) or getattr(tok, "clip", None) != key or not hasattr(cond, key):
        raise ValueError(f"{node}: this CLIP ({type(cond).__name__}) is not a single CLIP text encoder. Celeb Basis "
                         "supports SD1.x and SD2.x; SDXL's two encoders (CLIP-L + CLIP-G) are not supported yet.")
    return TextEncoder(getattr(cond, key), getattr(tok, key), getattr(tok, key).embedding_key)


# --- pseudo-words ------------------------------------------------------------------------------------------
def _word_dir() -> str:
    return os.path.join(folder_paths.get_temp_directory(), "facecond_pseudowords")


def embedding_file_name(vectors: torch.Tensor, key: str) -> str:
    data = vectors.detach().cpu().float().contiguous().numpy().tobytes()
    return f"facecond_pw_{hashlib.sha256(key.encode() + data).hexdigest()[:20]}"


class PseudoWordTokenizer:
    """A CLIP tokenizer that turns registered pseudo-words into ComfyUI ``embedding:`` references (see top).

    ``inner``: a shallow copy of the original tokenizer whose text-encoder tokenizer also searches the pack's
    pseudo-word folder. Everything else is delegated to it."""

    def __init__(self, inner, key: str, words: dict[str, torch.Tensor]):
        self.inner, self.key, self.words = inner, key, dict(words)
        self._names = {w: embedding_file_name(v, key) for w, v in self.words.items()}

    @classmethod
    def extend(cls, clip, enc: TextEncoder, word: str, vectors: torch.Tensor) -> PseudoWordTokenizer:
        tok = clip.tokenizer
        if isinstance(tok, PseudoWordTokenizer):
            return cls(tok.inner, tok.key, {**tok.words, word: vectors})
        inner = copy.copy(tok)
        sub = copy.copy(getattr(tok, enc.key))
        dirs = sub.embedding_directory
        dirs = [] if dirs is None else [dirs] if isinstance(dirs, str) else list(dirs)
        sub.embedding_directory = [_word_dir(), *dirs]
        setattr(inner, enc.key, sub)
        return cls(inner, enc.key, {word: vectors})

    def _ensure_files(self) -> None:
        folder = _word_dir()
        os.makedirs(folder, exist_ok=True)
        for word, name in self._names.items():
            path = os.path.join(folder, name + ".safetensors")
            if not os.path.isfile(path):
                save_file({self.key: self.words[word].detach().cpu().float().contiguous()}, path)

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


def check_word(word: str, clip, enc: TextEncoder, node: str) -> str:
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
    """A clone of ``clip`` in which ``word`` is the (K, d) token embeddings ``vectors``; the input is untouched."""
    enc = text_encoder(clip, node)
    word = check_word(word, clip, enc, node)
    d = enc.table().shape[1]
    if vectors.ndim != 2 or vectors.shape[1] != d:
        raise ValueError(f"{node}: the pseudo-word vectors are {tuple(vectors.shape)}; this text encoder needs "
                         f"(K, {d}).")
    out = clip.clone()
    out.tokenizer = PseudoWordTokenizer.extend(clip, enc, word, vectors.detach().cpu().float().clone())
    return out
