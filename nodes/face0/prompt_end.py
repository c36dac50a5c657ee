"""Where a prompt ends, found with the text encoder itself where the conditioning alone does not show it.

``py/face0/projection.prompt_ends`` finds the end-of-text (EOS) token of the first chunk by exact equality with the
pooled output, which works only where the context *is* the final layer (SD1.x at the default CLIP layer). SDXL's
context is CLIP-G's *raw* penultimate hidden state (ComfyUI ``comfy/sdxl_clip.py``: ``layer="penultimate"``,
``layer_norm_hidden_state=False``) and its pooled output is ``text_projection(final_layer_norm(h_last)[eos])``
(``comfy/clip_model.py``, ``CLIPTextModel_.forward`` and ``CLIPTextModel.forward``). CLIP's attention is causal, so
running the remaining layers, the final layer norm and the projection over the first chunk's CLIP-G rows gives, at
each position, what the pooled output would be if the prompt ended there; the EOS is the row that reproduces it.

Where the hidden state was layer-normalised before it reached the conditioning (SD2.x's OpenCLIP-H, SD1.x with
CLIP skip: ``layer_norm_hidden_state=True``), the residual stream cannot be recovered and nothing is found; the
caller then keeps the prompt whole and adds a chunk for the face. A prompt with token weights or anything else that
changed the context after encoding gives no match either, with the same safe result.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("facecond")

TOKENS = 77
MATCH_RTOL = 1e-3  # relative L2 distance accepted as "the same row": the recomputation is the encoder's own maths


def _settings(clip, g) -> tuple[int | None, bool]:
    """(layer index, projected pooled) that ``clip.encode_from_tokens`` uses: the model's defaults, or the layer a
    CLIPSetLastLayer put on the CLIP object (``comfy/sd.py``: ``set_clip_options({"layer": clip.layer_idx})``),
    read without changing the model."""
    layer, idx, projected = getattr(g, "options_default", (g.layer, g.layer_idx, g.return_projected_pooled))
    chosen = getattr(clip, "layer_idx", None)
    if chosen is not None:
        n_layers = len(g.transformer.text_model.encoder.layers)
        layer, idx = ("hidden", chosen) if abs(chosen) <= n_layers else ("last", None)
    if layer != "hidden" or g.layer_norm_hidden_state:
        return None, projected
    return idx, projected


def clip_prompt_ends(clip, context: torch.Tensor, pooled: torch.Tensor | None) -> int | None:
    """The first chunk's EOS position in ``context`` (B, 77·n, W) found through ``clip``'s CLIP-G (SDXL), or None.
    For a batch, the latest EOS over the rows (as ``prompt_ends``); None if any row has no match."""
    g = getattr(getattr(clip, "cond_stage_model", None), "clip_g", None)
    if g is None or pooled is None or pooled.ndim != 2 or context.ndim != 3 or context.shape[1] < TOKENS:
        return None
    idx, projected = _settings(clip, g)
    text = getattr(g.transformer, "text_model", None)
    if idx is None or text is None:
        return None
    width = text.final_layer_norm.weight.shape[0]
    b = context.shape[0]
    if context.shape[-1] <= width or pooled.shape[-1] != width or pooled.shape[0] not in (1, b):
        return None
    from comfy.clip_model import optimized_attention_for_device

    layers = text.encoder.layers
    start = (len(layers) + idx if idx < 0 else idx) + 1
    clip.load_model()
    device = clip.patcher.load_device
    with torch.inference_mode():
        h = context[:, :TOKENS, -width:].to(device=device, dtype=torch.float32).clone()  # CLIP-G is cat'ed last
        mask = torch.full((TOKENS, TOKENS), -torch.finfo(h.dtype).max, dtype=h.dtype, device=device).triu_(1)
        attention = optimized_attention_for_device(device, mask=True, small_input=True)
        for layer in layers[start:]:
            h = layer(h, mask, attention)  # CLIPLayer adds its residuals in place: h is our own copy
        h = text.final_layer_norm(h)
        if projected:
            h = g.transformer.text_projection(h)
        target = pooled.to(device=device, dtype=torch.float32)[:, None, :]
        dist = (h.float() - target).norm(dim=-1) / target.norm(dim=-1).clamp_min(1e-12)  # (B, 77)
    dist[:, 0] = float("inf")  # position 0 is BOS
    best = dist.min(dim=1)
    if not bool((best.values <= MATCH_RTOL).all()):
        log.debug("[facecond] prompt end not found through CLIP-G (closest relative distance %.3g)",
                  float(best.values.max()))
        return None
    first = (dist <= MATCH_RTOL).int().argmax(dim=1)  # the first matching position of each row
    return int(first.max())
