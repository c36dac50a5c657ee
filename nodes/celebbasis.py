"""Celeb Basis nodes (Yuan et al. 2023): a face as a pseudo-word in the loaded model's own celebrity-name space.

The maths is in ``py/celeb_basis.py`` (basis), ``py/celeb_coeffs.py`` (MLP, files), ``py/train_core.py`` and
``py/augment.py`` (training). These classes check inputs, call it and wrap results.

How a pseudo-word gets into a CLIP without touching the input CLIP or any ComfyUI function: ``clip.clone()``
gets a *new tokenizer object* (``PseudoWordTokenizer``) around a shallow copy of the original one whose
text-encoder tokenizer has one extra embedding folder. The pseudo-word's two vectors are written there as a
standard ComfyUI embedding file (content-addressed: ``facecond_pw_<sha>.safetensors``), and every
occurrence of the word in a prompt becomes ComfyUI's own ``embedding:facecond_pw_<sha>`` syntax, which
``sd1_clip`` resolves as it does for any textual-inversion embedding. So weights ``(<alice>:1.2)``, long
prompts and every text node behave as for ordinary embeddings, and the word's vectors enter the text encoder
only at its two token positions. Several identities: chain the node with different words.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import os
import re
from dataclasses import dataclass

import comfy.model_management
import comfy.model_sampling
import comfy.utils
import folder_paths
import torch
from safetensors.torch import save_file

from ..py import celeb_basis as cb
from ..py.augment import augment as augment_images
from ..py.celeb_coeffs import (
    BasisFacts,
    CelebCoeffs,
    CoeffMLP,
    fp16_exact,
    load_coeffs,
    load_mlp,
    new_mlp,
    save_coeffs,
    save_mlp,
)
from ..py.face_types import FaceEmbeds
from ..py.train_core import TrainConfig, Trainer, denoising_loss, sample_noise, sample_sigmas

log = logging.getLogger("facecond")

CATEGORY = "facecond/celebbasis"
FOLDER = "facecond_celebbasis"  # models/facecond/celebbasis: coefficient MLPs, names lists, saved identities
WORD_RE = re.compile(r"^(<[A-Za-z][A-Za-z0-9_\-]{0,31}>|[A-Za-z][A-Za-z0-9_]{1,31})$")
DEFAULT_TEMPLATES = "a photo of {}\na depiction of {}\na close-up photo of {}\na portrait of {}\n{} smiling"


# --- the text encoder of a CLIP ---------------------------------------------------------------------------
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
                tmp = f"{path}.{os.getpid()}.tmp"
                save_file({self.key: self.words[word].detach().cpu().float().contiguous()}, tmp)
                os.replace(tmp, path)

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


# --- basis for a CLIP ----------------------------------------------------------------------------------------
def _names_files() -> dict[str, str]:
    files = {"(pack list)": str(cb.NAMES_FILE)}
    for root in folder_paths.get_folder_paths(FOLDER):
        if os.path.isdir(root):
            for f in sorted(os.listdir(root)):
                if f.endswith(".txt"):
                    files[f] = os.path.join(root, f)
    return files


def basis_for(clip, names: list[str], p: int, node: str) -> tuple[cb.CelebBasis, TextEncoder]:
    enc = text_encoder(clip, node)
    return cb.cached_basis(enc.table(), names, enc.tokenize, p), enc


def names_with_hash(h: str, node: str, what: str) -> list[str]:
    for path in _names_files().values():
        names = cb.load_names(path)
        if cb.names_hash(names) == h:
            return names
    raise ValueError(f"{node}: {what} was made with a celebrity-name list (hash {h}) that is neither the pack's list "
                     f"nor a .txt file in models/facecond/celebbasis. Put the list it was trained with there.")


@dataclass(frozen=True)
class CelebMLP:
    """The CELEB_MLP socket: a coefficient MLP and what it was trained for."""

    mlp: CoeffMLP
    embedder: str
    names: tuple[str, ...]
    facts: BasisFacts


def _mlp_files() -> list[str]:
    return [f for f in folder_paths.get_filename_list(FOLDER) if f.endswith(".safetensors")
            and not f.endswith(".state.safetensors")]


def _mean_face(node: str, fe: FaceEmbeds, mlp: CelebMLP) -> torch.Tensor:
    if not isinstance(fe, FaceEmbeds) or len(fe) == 0:
        raise ValueError(f"{node}: face_embeds is empty or missing; connect FaceEmbed (a face must be found).")
    x = fe.embeds.float()
    if x.shape[1] != mlp.mlp.fc.in_features or mlp.embedder not in ("any", fe.model):
        raise ValueError(f"{node}: face_embeds come from {fe.model!r} ({x.shape[1]}-d) but the coefficient MLP was "
                         f"trained on {mlp.embedder!r} ({mlp.mlp.fc.in_features}-d). Embed with that model.")
    if not torch.isfinite(x).all():
        raise ValueError(f"{node}: face_embeds contain NaN or inf; re-embed the faces.")
    m = x.mean(0, keepdim=True)  # several photos of one person: their embeddings are averaged
    return torch.nn.functional.normalize(m, dim=-1) if fe.normalized else m


class CelebBasisCoeffs:
    DESCRIPTION = ("Celeb Basis: makes a face a word. From a face embedding (through a trained coefficient MLP) or "
                   "saved coefficients, builds the two token embeddings C̄_k + B_k·α_k in the celebrity-name basis "
                   "of this CLIP's own token table and returns a cloned CLIP in which pseudo_word (e.g. <alice>) "
                   "means that person: write it in any prompt ('<alice> as an astronaut'). Chain the node for "
                   "several people. SD1.x/SD2.x.")
    CATEGORY = CATEGORY
    FUNCTION = "apply"
    RETURN_TYPES = ("CLIP", "CELEB_COEFFS")
    RETURN_NAMES = ("clip", "coefficients")
    OUTPUT_TOOLTIPS = ("A clone of the CLIP that knows the pseudo-word (the input CLIP is unchanged).",
                       "The identity's 2 x p coefficients (save them with SaveCelebCoeffs).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip": ("CLIP", {"tooltip": "The checkpoint's CLIP (SD1.x / SD2.x). Its token table defines the basis."}),
            "pseudo_word": ("STRING", {"default": "<alice>", "tooltip": "The new word, written <name>; use it in "
                            "prompts exactly like this."}),
            "mlp_name": (["none", *_mlp_files()], {"default": "none", "tooltip": "Trained coefficient MLP in "
                         "models/facecond/celebbasis (from TrainCelebBasis). Not needed with coefficients."}),
        }, "optional": {
            "face_embeds": ("FACE_EMBEDS", {"tooltip": "The person's face embedding(s), from FaceEmbed with the "
                            "embedder the MLP was trained on; several photos are averaged."}),
            "celeb_mlp": ("CELEB_MLP", {"tooltip": "A coefficient MLP straight from TrainCelebBasis (overrides "
                          "mlp_name)."}),
            "coefficients": ("CELEB_COEFFS", {"tooltip": "Saved coefficients (LoadCelebCoeffs); when connected, "
                             "face_embeds and the MLP are not used."}),
        }}

    def apply(self, clip, pseudo_word, mlp_name, face_embeds=None, celeb_mlp=None, coefficients=None):
        node = "CelebBasisCoeffs"
        if coefficients is not None:
            c = coefficients
            names = names_with_hash(c.facts.names_hash, node, "coefficients")
            basis, _ = basis_for(clip, names, c.facts.p, node)
            c.facts.check(basis, f"{node}: coefficients")
        else:
            if celeb_mlp is None:
                if mlp_name == "none":
                    raise ValueError(f"{node}: nothing to make the word from. Connect coefficients (LoadCelebCoeffs), "
                                     "or face_embeds plus a coefficient MLP (mlp_name or celeb_mlp).")
                celeb_mlp = load_celeb_mlp(mlp_name)
            if face_embeds is None:
                raise ValueError(f"{node}: the coefficient MLP needs face_embeds; connect FaceEmbed.")
            basis, _ = basis_for(clip, list(celeb_mlp.names), celeb_mlp.facts.p, node)
            celeb_mlp.facts.check(basis, f"{node}: the coefficient MLP")
            with torch.inference_mode():
                alpha = celeb_mlp.mlp(_mean_face(node, face_embeds, celeb_mlp))[0]
            # stored as fp16 in files: round now so a saved identity gives the same conditioning bit for bit
            c = CelebCoeffs(fp16_exact(alpha), celeb_mlp.facts, source=f"mlp:{mlp_name}/{face_embeds.model}")
        vectors = basis.embeddings(c.coeffs.float())
        return (add_pseudo_word(clip, pseudo_word, vectors, node), c)


def load_celeb_mlp(name: str) -> CelebMLP:
    mlp, info = load_mlp(folder_paths.get_full_path_or_raise(FOLDER, name))
    return CelebMLP(mlp, info["embedder"], tuple(info["names"]), info["facts"])


class SaveCelebCoeffs:
    DESCRIPTION = "Saves an identity's Celeb Basis coefficients (2 x p fp16, about 2 KB) with its basis facts."
    CATEGORY = CATEGORY
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("file",)
    OUTPUT_TOOLTIPS = ("The saved file's name in models/facecond/celebbasis (what LoadCelebCoeffs lists).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "coefficients": ("CELEB_COEFFS", {"tooltip": "From CelebBasisCoeffs."}),
            "filename_prefix": ("STRING", {"default": "identities/person", "tooltip": "Name under models/facecond/"
                                "celebbasis; a counter and .safetensors are added. May contain a subfolder."}),
        }}

    def save(self, coefficients, filename_prefix):
        root = folder_paths.get_folder_paths(FOLDER)[0]
        full_dir, name, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, root)
        os.makedirs(full_dir, exist_ok=True)
        file = f"{name}_{counter:05}_.safetensors"
        save_coeffs(coefficients, os.path.join(full_dir, file))
        return (os.path.join(subfolder, file) if subfolder else file,)


class LoadCelebCoeffs:
    DESCRIPTION = "Loads saved Celeb Basis coefficients (an identity) for CelebBasisCoeffs."
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("CELEB_COEFFS",)
    RETURN_NAMES = ("coefficients",)
    OUTPUT_TOOLTIPS = ("The identity's coefficients and the basis they belong to.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"coeffs_name": (_mlp_files(), {"tooltip": "A coefficients file in "
                                                            "models/facecond/celebbasis (SaveCelebCoeffs)."})}}

    def load(self, coeffs_name):
        return (load_coeffs(folder_paths.get_full_path_or_raise(FOLDER, coeffs_name)),)


# --- training ------------------------------------------------------------------------------------------------
def _grad_safe_weight(weight: torch.Tensor) -> torch.Tensor:
    # ComfyUI's ops copy a weight that has a wrapper (cast_bias_weight, copy=True); the copy is made in the
    # trainer's normal mode. This makes sure of it for a weight still created under inference mode.
    return weight.clone() if weight.is_inference() else weight


def grad_safe(patcher):
    """A clone of a ModelPatcher whose weights autograd can differentiate *through* (never *to*).

    The ComfyUI server runs every node under ``torch.inference_mode()``, so the weights of a model it loaded are
    inference tensors, which autograd refuses to save for backward ("Inference tensors cannot be saved for
    backward"). A weight wrapper on every op (ComfyUI's own mechanism, as its LoRA trainer uses) makes each
    forward use a normal-tensor copy; the user's model and its weights are untouched."""
    out = patcher.clone()
    for name, m in out.model.named_modules():
        for attr in ("weight", "bias"):  # layer_norm saves its bias for backward too
            if hasattr(m, f"{attr}_function") and getattr(m, attr, None) is not None:
                out.add_weight_wrapper(f"{name}.{attr}", _grad_safe_weight)
    return out


def trainable_clip(clip):
    """A clone of ``clip`` for ``encode_with`` under the server's inference mode (see ``grad_safe``)."""
    out = clip.clone()
    out.patcher = grad_safe(out.patcher)
    return out


def normal_tensor(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` that is not an inference tensor (so autograd may save it for backward)."""
    with torch.inference_mode(False):
        return t.detach().clone()


def model_denoiser(model, node: str):
    """(denoise(x, sigma, context) -> x0, sigma table) for a ComfyUI MODEL; EPS / V-prediction only.
    Differentiable w.r.t. x and context also when the server loaded the model (``grad_safe``)."""
    ms = model.get_model_object("model_sampling")
    if not isinstance(ms, comfy.model_sampling.EPS) or isinstance(ms, comfy.model_sampling.CONST):
        raise ValueError(f"{node}: training needs an eps- or v-prediction model (SD1.x / SD2.x); this model's "
                         f"sampling is {type(ms).__name__}.")
    model = grad_safe(model)
    comfy.model_management.load_models_gpu([model])
    inner = model.model

    def denoise(x, sigma, context, _keep=model):  # _keep: the wrapped clone stays alive while training
        return inner.apply_model(x, sigma, c_crossattn=context)

    return denoise, ms.sigmas, model.load_device


def template_tokens(clip, templates: list[str], node: str, k: int = 2) -> list[list]:
    """Token lists of each template with a k-vector placeholder embedding where ``{}`` is."""
    marker = "<facecondplaceholder>"
    probe = add_pseudo_word(clip, marker, torch.zeros(k, text_encoder(clip, node).table().shape[1]), node)
    out = []
    for t in templates:
        if t.count("{}") != 1:
            raise ValueError(f"{node}: prompt template {t!r} must contain {{}} exactly once (where the person goes).")
        toks = probe.tokenize(t.replace("{}", marker))
        out.append(toks)
    return out


def encode_with(clip, tokens, vectors: torch.Tensor, node: str = "TrainCelebBasis") -> torch.Tensor:
    """Encode ``tokens`` (from template_tokens with k = len(vectors)) with the placeholder's k entries replaced
    by ``vectors`` (K, d), differentiably w.r.t. ``vectors`` (pass a ``trainable_clip`` in the server).
    ComfyUI builds the input embeddings (``process_tokens``); the transformer
    is then run with out-of-place residuals, because ComfyUI's ``CLIPLayer`` adds them in place (``x += ...``),
    which autograd cannot differentiate. Same weights, same ops: the result equals ComfyUI's encode (tested)."""
    from comfy.ldm.modules.attention import optimized_attention_for_device
    from comfy.ops import cast_to

    enc = text_encoder(clip, node)
    sd = enc.module
    if getattr(sd, "enable_attention_masks", False) or getattr(sd, "zero_out_masked", False):
        raise ValueError(f"{node}: this text encoder uses attention masks; training supports SD1.x/SD2.x CLIP.")
    chunks = tokens[next(iter(tokens))]
    if len(chunks) != 1:
        raise ValueError(f"{node}: a prompt template is longer than 75 tokens; shorten it.")
    row, i = [], 0
    for tw in chunks[0]:
        if torch.is_tensor(tw[0]):
            row.append(vectors[i % len(vectors)])
            i += 1
        else:
            row.append(tw[0])
    if i != len(vectors):
        raise ValueError(f"{node}: the prompt has {i} placeholder token(s) for {len(vectors)} vectors")
    clip.cond_stage_model.reset_clip_options()
    if clip.layer_idx is not None:
        clip.cond_stage_model.set_clip_options({"layer": clip.layer_idx})
    clip.load_model()
    device = sd.transformer.get_input_embeddings().weight.device
    embeds, _, _, _ = sd.process_tokens([row], device)
    tm = sd.transformer.text_model
    x = embeds + cast_to(tm.embeddings.position_embedding.weight, dtype=embeds.dtype, device=device)
    mask = torch.full((x.shape[1], x.shape[1]), -torch.finfo(x.dtype).max, dtype=x.dtype, device=device).triu_(1)
    attn = optimized_attention_for_device(device, mask=True, small_input=True)  # as CLIPEncoder
    layers = tm.encoder.layers
    if sd.layer not in ("last", "hidden"):
        raise ValueError(f"{node}: text-encoder output layer {sd.layer!r} is not supported (last/hidden).")
    stop = len(layers) - 1 if sd.layer == "last" else (sd.layer_idx % len(layers))
    for layer in layers[:stop + 1]:
        x = x + layer.self_attn(layer.layer_norm1(x), mask, attn)
        x = x + layer.mlp(layer.layer_norm2(x))
    if sd.layer == "last" or sd.layer_norm_hidden_state:
        x = tm.final_layer_norm(x)
    return x.float()


def encode_images(vae, model, images: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        lat = vae.encode(images[..., :3])
        lat = model.model.process_latent_in(lat)
    return lat.clone()


def parse_identities(text: str, n: int, node: str) -> list[int]:
    if not text.strip():
        return [0] * n
    labels = [s.strip() for s in text.replace(";", ",").split(",") if s.strip()]
    if len(labels) != n:
        raise ValueError(f"{node}: identities has {len(labels)} labels for {n} images; give one per image, e.g. "
                         "'a,a,b' (or leave it empty: one person).")
    order = list(dict.fromkeys(labels))
    return [order.index(s) for s in labels]


class TrainCelebBasis:
    DESCRIPTION = ("Trains the Celeb Basis coefficient MLP (face embedding -> 2 x p coefficients, one linear layer + "
                   "L2 norm) with the plain denoising loss on this model: UNet, text encoder, basis and face model "
                   "are frozen, only the MLP learns. One or several photos, one or several people (jointly, one "
                   "shared MLP). Deterministic for a seed; cancel any time; resume=true continues a saved run.")
    CATEGORY = CATEGORY
    FUNCTION = "train"
    OUTPUT_NODE = True
    RETURN_TYPES = ("CELEB_MLP", "STRING", "STRING")
    RETURN_NAMES = ("celeb_mlp", "mlp_name", "report")
    OUTPUT_TOOLTIPS = ("The trained MLP (connect to CelebBasisCoeffs).",
                       "The file written to models/facecond/celebbasis.", "Losses and settings.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The diffusion model to train against (frozen)."}),
            "clip": ("CLIP", {"tooltip": "Its CLIP (frozen); its token table defines the basis."}),
            "vae": ("VAE", {"tooltip": "Encodes the photos to latents."}),
            "images": ("IMAGE", {"tooltip": "Photos of the person/people (face crops work best), one "
                       "per face embedding."}),
            "face_embeds": ("FACE_EMBEDS", {"tooltip": "One embedding per image (FaceEmbed), row i for image i."}),
            "identities": ("STRING", {"default": "", "tooltip": "One label per image ('a,a,b'): images with the same "
                           "label are one person. Empty: all images are one person."}),
            "prompt_templates": ("STRING", {"default": DEFAULT_TEMPLATES, "multiline": True, "tooltip":
                                 "One prompt per line; {} is where the person's pseudo-word goes."}),
            "steps": ("INT", {"default": 400, "min": 1, "max": 100000, "tooltip": "Optimiser steps in total."}),
            "learning_rate": ("FLOAT", {"default": 0.005, "min": 1e-6, "max": 1.0, "step": 1e-4, "round": 1e-6,
                              "tooltip": "Adam learning rate."}),
            "p": ("INT", {"default": 512, "min": 1, "max": 4096, "tooltip": "Basis size (principal components per "
                  "token); capped at names - 1 and the token width."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "tooltip": "Fixes the MLP init, "
                     "noise, timesteps, templates and augmentation."}),
            "augment": ("BOOLEAN", {"default": True, "tooltip": "Colour jitter, random resize and shift."}),
            "save_name": ("STRING", {"default": "celeb_mlp", "tooltip": "File name (without extension) in "
                          "models/facecond/celebbasis; the trainer state goes next to it as .state.safetensors."}),
            "resume": ("BOOLEAN", {"default": False, "tooltip": "Continue from save_name's trainer state "
                       "if it exists."}),
        }}

    def train(self, model, clip, vae, images, face_embeds, identities, prompt_templates, steps, learning_rate, p,
              seed, augment, save_name, resume):
        node = "TrainCelebBasis"
        n = images.shape[0]
        if not isinstance(face_embeds, FaceEmbeds) or len(face_embeds) != n:
            raise ValueError(f"{node}: {n} images but {len(face_embeds) if face_embeds is not None else 0} face "
                             "embeddings; give one face per image (FaceDetectCrop select=largest, no_face=error).")
        if not re.fullmatch(r"[\w\-. /]+", save_name) or ".." in save_name:
            raise ValueError(f"{node}: save_name {save_name!r} must be a plain file name (letters, digits, _-./).")
        ids = parse_identities(identities, n, node)
        templates = [t.strip() for t in prompt_templates.splitlines() if t.strip()]
        names = cb.load_names()
        basis, _ = basis_for(clip, names, p, node)
        denoise, sigmas, device = model_denoiser(model, node)
        # the server runs nodes under inference mode: tensors autograd saves must be normal ones (grad_safe)
        basis = dataclasses.replace(basis, mean=normal_tensor(basis.mean), basis=normal_tensor(basis.basis))
        feats = normal_tensor(face_embeds.embeds.float())
        tclip = trainable_clip(clip)
        with torch.inference_mode(False):
            people = torch.stack([feats[[i for i in range(n) if ids[i] == k]].mean(0) for k in range(max(ids) + 1)])
            if face_embeds.normalized:
                people = torch.nn.functional.normalize(people, dim=-1)
            mlp = new_mlp(feats.shape[1], basis, seed).to(device)
        tokens = template_tokens(clip, templates, node)
        pixels = images[..., :3].movedim(-1, 1).float()  # (N, 3, H, W)
        fixed_latents = None if augment else encode_images(vae, model, images)
        people = people.to(device)

        def loss_fn(step, g):
            i = int(torch.randint(0, n, (1,), generator=g))
            t = int(torch.randint(0, len(tokens), (1,), generator=g))
            if fixed_latents is None:
                img = augment_images(pixels[i:i + 1], g).movedim(1, -1)
                x0 = encode_images(vae, model, img).to(device)
            else:
                x0 = fixed_latents[i:i + 1].to(device)
            sigma, _ = sample_sigmas(sigmas, 1, g)
            noise = sample_noise(x0, g)
            vectors = basis.embeddings(mlp(people[ids[i]:ids[i] + 1])[0])
            context = encode_with(tclip, tokens[t], vectors)
            return denoising_loss(denoise, x0, context.to(device), sigma, noise)

        trainer = Trainer(dict(mlp.named_parameters()), TrainConfig(steps=steps, lr=learning_rate, seed=seed))
        root = folder_paths.get_folder_paths(FOLDER)[0]
        path = os.path.join(root, save_name + ".safetensors")
        state_path = os.path.join(root, save_name + ".state.safetensors")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if resume and os.path.isfile(state_path):
            trainer.load(state_path)
            log.info("[facecond] %s: resuming %s at step %d", node, save_name, trainer.step)
        pbar = comfy.utils.ProgressBar(steps)

        def progress(done, total, loss):
            pbar.update_absolute(done, total)
            if done == 1 or done % 10 == 0 or done == total:
                log.info("[facecond] %s step %d/%d loss %.5f", node, done, total, loss)

        try:
            trainer.run(loss_fn, progress=progress,
                        check_interrupt=comfy.model_management.throw_exception_if_processing_interrupted)
        finally:  # an interrupted run can be resumed from its last finished step
            trainer.save(state_path, {"node": node, "basis_id": basis.basis_id})
        mlp = mlp.cpu().eval()
        save_mlp(mlp, path, basis, embedder=face_embeds.model, names=names, steps=trainer.step)
        facts = BasisFacts(basis.p, basis.table_hash, basis.names_hash)
        losses = trainer.losses
        report = (f"{node}: {trainer.step} steps, {max(ids) + 1} identities, {n} images, p={basis.p}; loss first "
                  f"{losses[0]:.4f} last {losses[-1]:.4f}" if losses else f"{node}: nothing to do")
        return (CelebMLP(mlp, face_embeds.model, tuple(names), facts), os.path.relpath(path, root), report)


NODE_CLASS_MAPPINGS = {
    "FacecondCelebBasisCoeffs": CelebBasisCoeffs,
    "FacecondSaveCelebCoeffs": SaveCelebCoeffs,
    "FacecondLoadCelebCoeffs": LoadCelebCoeffs,
    "FacecondTrainCelebBasis": TrainCelebBasis,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FacecondCelebBasisCoeffs": "CelebBasisCoeffs",
    "FacecondSaveCelebCoeffs": "SaveCelebCoeffs",
    "FacecondLoadCelebCoeffs": "LoadCelebCoeffs",
    "FacecondTrainCelebBasis": "TrainCelebBasis",
}
