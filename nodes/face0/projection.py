"""Face0 (Valevski et al. 2023, "Face0: Instantaneously Conditioning a Text-to-Image Model on a Face",
arXiv 2306.06638): load a projection and put a face into the text context. The maths lives in
``py/face0/projection.py``; the three-way guider and sampler are in ``guidance.py``.

Face0's unconditional input is *empty text + zero face*, its text-only input *text + zero face*: the projection
was trained with the projected tokens zeroed 10% of the time, so "no face" means zero tokens.

Long prompts: the face never replaces a prompt token or an end-of-text token. Where the prompt ends is read from the
conditioning's pooled output (``prompt_ends``; exact for SD1.x at the default CLIP layer, first chunk) or through
the text encoder's own last layers (``prompt_end.clip_prompt_ends``: SDXL, SD2, SD1.x with CLIP skip 2); a chunk
without visible padding at tokens 75-77 keeps its tokens and the face goes into an added chunk (``place_face_tokens``).
"""

from __future__ import annotations

import logging

import folder_paths
import torch

from ...py.face0.projection import TOKENS_PER_CHUNK, face_tokens, load_projection, place_face_tokens, prompt_ends
from .. import model_cache
from ..common import FACE0_PROJECTION, FACE_EMBEDS, require_embeds
from .branches import mark_entries
from .prompt_end import clip_prompt_ends

log = logging.getLogger("facecond")

PROJECTION_FOLDER = "facecond_face0"  # models/facecond/face0, registered by nodes/model_paths.py
CATEGORY = "facecond/face0"
CHUNK_MODES = ["each", "first", "last"]


class LoadFace0Projection:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"projection_name": (folder_paths.get_filename_list(PROJECTION_FOLDER), {
            "tooltip": "Face0 projection (.safetensors) in models/facecond/face0. Its metadata says which face "
                       "embedder and which base model (context width) it was trained for."})}}

    RETURN_TYPES = (FACE0_PROJECTION,)
    RETURN_NAMES = ("projection",)
    OUTPUT_TOOLTIPS = ("The Face0 projection MLP: face embedding -> K context tokens.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads a Face0 projection (4-layer MLP) from models/facecond/face0."

    def load(self, projection_name):
        proj = model_cache.load_picked("face0-projection", "LoadFace0Projection", "projection_name", PROJECTION_FOLDER,
                                       projection_name, load_projection)
        log.info("[facecond] loaded Face0 projection %s (%s)", projection_name, proj.info)
        return (proj,)


def _check_context(node: str, input_name: str, conditioning, proj) -> None:
    info = proj.info
    if not conditioning:
        raise ValueError(f"{node}: {input_name} is an empty conditioning list. Connect a CLIPTextEncode output.")
    for ctx, _ in conditioning:
        if ctx.ndim != 3 or ctx.shape[-1] != info.context_dim:
            raise ValueError(
                f"{node}: {input_name} has context width {ctx.shape[-1] if ctx.ndim == 3 else tuple(ctx.shape)} but "
                f"the projection makes {info.context_dim}-wide tokens (base model {info.base_model!r}). Load a "
                "projection trained for this checkpoint's family (768: SD1.x, 1024: SD2.x, 2048: SDXL).")
        if ctx.shape[1] % TOKENS_PER_CHUNK:
            raise ValueError(f"{node}: {input_name} has {ctx.shape[1]} tokens, not a multiple of "
                             f"{TOKENS_PER_CHUNK}; Face0 needs a CLIP text context (SD1.x, SD2.x, SDXL).")


def apply_face_tokens(conditioning, tokens: torch.Tensor | None, k: int, chunks: str, node: str,
                      empty_chunk: torch.Tensor, is_empty: bool = False, clip=None, found: dict | None = None):
    """A copy of ``conditioning`` with ``tokens`` (N, K, W), or zeros if None, placed by ``place_face_tokens``:
    at the end of the chunks ``chunks`` names where that is padding, else in added chunks (``empty_chunk`` + face).

    Where the prompt ends comes from ``prompt_ends`` (the pooled output) or, where the context does not show it,
    from ``clip``'s own CLIP-G layers (``prompt_end.clip_prompt_ends``: SDXL); ``is_empty``: the conditioning is the
    empty prompt (empty_conditioning's contract), whose EOS is token 2, when its pooled output does not show it.
    Batch rule per entry of batch B: B == N pairs row i with embedding i; B == 1 repeats the prompt for the
    N faces; N == 1 puts the one face into every row; anything else is an error. Other keys (pooled_output,
    masks, areas, hooks) are kept as they are; a batch-1 pooled output is broadcast by ComfyUI.
    """
    out = []
    for ctx, opts in conditioning:
        b, _, width = ctx.shape
        if tokens is None:
            tok, base = torch.zeros(b, k, width), ctx
        else:
            n = tokens.shape[0]
            if b == n:
                tok, base = tokens, ctx
            elif b == 1:
                tok, base = tokens, ctx.expand(n, -1, -1)
            elif n == 1:
                tok, base = tokens.expand(b, -1, -1), ctx
            else:
                raise ValueError(f"{node}: {n} face embeddings for a conditioning batch of {b}. Give one face, "
                                 f"one prompt, or as many faces as prompts.")
        if found is not None and id(ctx) in found:  # positive and text_only share the prompt: search once
            ends = list(found[id(ctx)])
        else:
            ends = prompt_ends(ctx, opts.get("pooled_output"))
            if ends[0] is None and clip is not None and not is_empty:
                ends[0] = clip_prompt_ends(clip, ctx, opts.get("pooled_output"))
            if found is not None:
                found[id(ctx)] = tuple(ends)
        if is_empty and ends == [None]:
            ends = [1]
        placed, added = place_face_tokens(base, tok, chunks, ends, empty_chunk)
        if added and tokens is not None:
            log.warning("[facecond] %s: the prompt (%d tokens of context) leaves no padding for the face at the end "
                        "of %s; its tokens are kept and the face goes into %d added chunk%s (empty prompt + face), "
                        "context now %d tokens.", node, ctx.shape[1],
                        "a chunk" if added == 1 else f"{added} chunks", added, "" if added == 1 else "s",
                        placed.shape[1])
        out.append([placed, opts.copy()])
    return out


class ProjectToContext:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "conditioning": ("CONDITIONING", {"tooltip": "The text prompt (CLIPTextEncode). The projected face "
                                                  "takes its padding at tokens 75-77 (the paper's positions) when "
                                                  "the prompt leaves them free; its own tokens are never replaced."}),
                "face_embeds": (FACE_EMBEDS, {"tooltip": "N face embeddings: N embeddings and a "
                                                "one-prompt conditioning give a conditioning batch of N (use a latent "
                                                "batch of N)."}),
                "projection": (FACE0_PROJECTION, {"tooltip": "From LoadFace0Projection."}),
                "clip": ("CLIP", {"tooltip": "Encodes the empty prompt for face_only and negative (Face0's "
                                  "unconditional input is empty text + zero face)."}),
                "chunks": (CHUNK_MODES, {"default": "each", "tooltip": "Which 77-token chunks of the prompt get "
                           "the face (prompts over 75 tokens are several chunks). each: one face per chunk (the face "
                           "keeps its share of attention); first / last: one face, for that chunk. A chunk gets the "
                           "face at its tokens 75-77 only where they are padding (at most 72 prompt tokens in it, and "
                           "its end found: SD1.x, SD2 and SDXL, first chunk). Otherwise (a long prompt; token weights, "
                           "or CLIP skip 3+ on SD1.x/SD2, whose end cannot be found) the chunk stays whole and its "
                           "face goes into an added chunk, the empty prompt + face, appended after the prompt "
                           "(logged)."}),
            },
            "optional": {
                "empty_conditioning": ("CONDITIONING", {"tooltip": "Optional: use this instead of encoding \"\" "
                                       "with clip (e.g. an SDXL encode with size settings). Must encode the empty "
                                       "prompt: its first chunk is also the chunk added for long prompts."}),
            },
        }

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "text_only", "face_only", "negative")
    OUTPUT_TOOLTIPS = ("text + face: ε(d, f)", "text + zero face: ε(d)", "empty text + face: ε(f)",
                       "empty text + zero face: the unconditional ε(∅)")
    FUNCTION = "project"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Face0: puts the projected face embedding into the text context as K (=3) tokens: tokens 75-77 of a "
        "77-token chunk, as in the paper, where they are padding; a prompt too long for that (or whose end the "
        "conditioning cannot show: token weights, CLIP skip 3+ on SD1.x/SD2) is kept whole and gets an added chunk "
        "(empty prompt + face). A zero embedding (or the text_only / negative outputs) gives zero tokens, the "
        "training-time 'no face' input. SDXL: needs a 2048-wide projection; the pooled output is left alone. Never "
        "edits its inputs.")

    def project(self, conditioning, face_embeds, projection, clip, chunks, empty_conditioning=None):
        node = "ProjectToContext"
        info = projection.info
        x = require_embeds(node, "face_embeds", face_embeds, dim=info.embed_dim, embedder=info.embedder,
                           against="the projection takes", fix="or load a projection trained for that embedder")
        if empty_conditioning is None:
            if clip is None:
                raise ValueError(f"{node}: clip is None (the checkpoint has no text encoder); connect "
                                 "empty_conditioning instead.")
            empty_conditioning = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        _check_context(node, "conditioning", conditioning, projection)
        _check_context(node, "empty_conditioning", empty_conditioning, projection)
        model_cache.to_device(projection)
        with torch.inference_mode():
            tokens = face_tokens(projection, x).cpu()  # (N, K, W); zero rows → zero tokens
        k = projection.info.tokens
        empty_chunk = empty_conditioning[0][0][:1, :TOKENS_PER_CHUNK]  # (1, 77, W): the empty prompt's encoding
        found = {}  # where each prompt entry ends, found once for positive and text_only
        positive = apply_face_tokens(conditioning, tokens, k, chunks, node, empty_chunk, clip=clip, found=found)
        text_only = apply_face_tokens(conditioning, None, k, chunks, node, empty_chunk, clip=clip, found=found)
        face_only = apply_face_tokens(empty_conditioning, tokens, k, chunks, node, empty_chunk, is_empty=True)
        negative = apply_face_tokens(empty_conditioning, None, k, chunks, node, empty_chunk, is_empty=True)
        mark_entries(positive, text_only, face_only, negative)  # the guider pairs the entries by this mark
        return (positive, text_only, face_only, negative)


NODE_CLASS_MAPPINGS = {
    "FacecondLoadFace0Projection": LoadFace0Projection,
    "FacecondProjectToContext": ProjectToContext,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FacecondLoadFace0Projection": "LoadFace0Projection",
    "FacecondProjectToContext": "ProjectToContext",
}
