"""Where a prompt ends, found with the text encoder itself where the conditioning alone does not show it.

``py/face0/projection.prompt_ends`` finds the end-of-text (EOS) token of the first chunk by exact equality with the
pooled output, which works only where the context *is* the final layer (SD1.x at the default CLIP layer). Elsewhere
the context is a hidden state a few layers earlier and the pooled output is ``P(LN_f(h_last)[eos])``: the final
layer norm of the last layer's state at the EOS, projected by ``P`` (the text projection, or none) (ComfyUI
``comfy/clip_model.py``, ``CLIPTextModel_.forward`` and ``CLIPTextModel.forward``). CLIP's attention is causal, so
recomputing the remaining layers over the first chunk gives, at each position, what the pooled output would be if
the prompt ended there; the EOS is the row that reproduces it. Two cases are exact:

* **raw hidden state** (SDXL's CLIP-L and CLIP-G, ``layer_norm_hidden_state=False``, any CLIP skip): the remaining
  layers are run as they are (the CLIP-G half, the last 1280 columns, against the pooled output).
* **one layer from the end, layer-normalised** (SD2.x's OpenCLIP-H at its default penultimate layer, SD1.x with
  CLIP skip 2: ``layer_norm_hidden_state=True``): the context row is ``LN_f(x) = γ·z + β`` with ``z = (x − μ)/s``, so
  ``z`` is known and ``μ``, ``s`` are not. A pre-LN block needs only ``z`` and ``s``: ``LN1(x) = LN1(z)`` (scale and
  shift invariant), so the causal attention ``a`` is exact, and ``x + a − μ = s·z + a`` enters ``LN2``, the MLP and
  ``LN_f`` where ``μ`` cancels. One unknown scalar ``s`` per row: the EOS row is the one where some ``s`` reproduces
  the pooled output (searched on a log grid, then refined by golden section); no other row can, a 1-parameter curve
  against a 768-1280-d target.

More layers after a normalised state (CLIP skip 3 or more on SD1.x/SD2.x) cannot be undone: nothing is found, and the
caller keeps the prompt whole and adds a chunk for the face. A prompt with token weights or anything else that changed
the context after encoding gives no match either, with the same safe result.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("facecond")

TOKENS = 77
MATCH_RTOL = 1e-3  # relative L2 distance accepted as "the same row": the recomputation is the encoder's own maths


def _settings(clip, m) -> tuple[int | None, bool]:
    """(layer index, projected pooled) that ``clip.encode_from_tokens`` uses for the encoder ``m``: its defaults, or
    the layer a CLIPSetLastLayer put on the CLIP object (``comfy/sd.py``: ``set_clip_options({"layer":
    clip.layer_idx})``), read without changing the model. None: the context is the final layer (or all layers)."""
    layer, idx, projected = getattr(m, "options_default", (m.layer, m.layer_idx, m.return_projected_pooled))
    chosen = getattr(clip, "layer_idx", None)
    if chosen is not None:
        n_layers = len(m.transformer.text_model.encoder.layers)
        layer, idx = ("hidden", chosen) if abs(chosen) <= n_layers else ("last", None)
    return (idx if layer == "hidden" and isinstance(idx, int) else None), projected


def _encoder(clip, width: int, pooled_width: int):
    """The text encoder whose hidden states are the last columns of a ``width``-wide context and whose pooled output
    the conditioning carries: SDXL's CLIP-G, SD2's OpenCLIP-H, SD1's CLIP-L."""
    csm = getattr(clip, "cond_stage_model", None)
    for name in ("clip_g", "clip_h", "clip_l"):
        m = getattr(csm, name, None)
        text = getattr(getattr(m, "transformer", None), "text_model", None)
        if text is None:
            continue
        w = text.final_layer_norm.weight.shape[0]
        if w <= width and pooled_width in (w, getattr(m.transformer.text_projection, "out_features", w)):
            return m, text, w
    return None, None, 0


def _distance(h: torch.Tensor, proj, projected: bool, target: torch.Tensor) -> torch.Tensor:
    """Relative L2 distance of LN_f outputs ``h`` (..., W), projected as the pooled output is, to ``target``."""
    out = proj(h) if projected else h
    return (out.float() - target).norm(dim=-1) / target.norm().clamp_min(1e-12)


def _run_raw(layers, h, mask, attention):
    for layer in layers:
        h = layer(h, mask, attention)  # CLIPLayer adds its residuals in place: h is our own copy
    return h


def _search_scale(layer, ln_f, z, a, proj, projected, target) -> torch.Tensor:
    """Per row j of ``z``/``a`` (77, W), the smallest distance over the residual scale s of
    LN_f(y + MLP(LN2(y))), y = s·z_j + a_j, to ``target``: a log grid over every row, then golden section on the best
    rows (module docstring)."""

    def dist(s, rows):  # s: (S,) scales; rows: indices -> (S, len(rows))
        y = s[:, None, None] * z[rows][None] + a[rows][None]
        y = y + layer.mlp(layer.layer_norm2(y))
        return _distance(ln_f(y), proj, projected, target)

    grid = torch.logspace(-3, 4, 57, device=z.device)
    rows = torch.arange(1, z.shape[0], device=z.device)
    coarse = dist(grid, rows)  # (57, 76)
    best = torch.full((z.shape[0],), float("inf"), device=z.device)
    best[1:] = coarse.min(dim=0).values
    for j in best[1:].argsort()[:3].tolist():  # refine the three closest rows
        k = int(coarse[:, j].argmin())
        lo, hi = grid[max(k - 1, 0)].log(), grid[min(k + 1, len(grid) - 1)].log()
        r = torch.tensor([j + 1], device=z.device)
        g = (5 ** 0.5 - 1) / 2
        for _ in range(60):
            m1, m2 = hi - g * (hi - lo), lo + g * (hi - lo)
            d = dist(torch.stack([m1, m2]).exp(), r)[:, 0]
            lo, hi = (lo, m2) if d[0] <= d[1] else (m1, hi)
        best[j + 1] = dist(((lo + hi) / 2).exp()[None], r)[0, 0]
    return best


def clip_prompt_ends(clip, context: torch.Tensor, pooled: torch.Tensor | None) -> int | None:
    """The first chunk's EOS position in ``context`` (B, 77·n, W) found through ``clip``'s own text encoder (module
    docstring), or None. For a batch, the latest EOS over the rows (as ``prompt_ends``); None if any row has none."""
    if pooled is None or pooled.ndim != 2 or context.ndim != 3 or context.shape[1] < TOKENS:
        return None
    m, text, width = _encoder(clip, context.shape[-1], pooled.shape[-1])
    if m is None or pooled.shape[0] not in (1, context.shape[0]):
        return None
    idx, projected = _settings(clip, m)
    if idx is None:
        return None
    from comfy.clip_model import optimized_attention_for_device

    layers = text.encoder.layers
    start = (len(layers) + idx if idx < 0 else idx) + 1
    normed = bool(getattr(m, "layer_norm_hidden_state", True))
    if normed and start != len(layers) - 1:
        return None
    clip.load_model()
    device = clip.patcher.load_device
    ln_f, proj = text.final_layer_norm, m.transformer.text_projection
    ends = []
    with torch.inference_mode():
        mask = torch.full((TOKENS, TOKENS), -torch.finfo(torch.float32).max, device=device).triu_(1)
        attention = optimized_attention_for_device(device, mask=True, small_input=True)
        for i in range(context.shape[0]):
            h = context[i:i + 1, :TOKENS, -width:].to(device=device, dtype=torch.float32).clone()
            target = pooled[min(i, pooled.shape[0] - 1)].to(device=device, dtype=torch.float32)
            if not normed:
                dist = _distance(ln_f(_run_raw(layers[start:], h, mask, attention)), proj, projected, target)[0]
            else:
                gamma, beta = ln_f.weight.float().to(device), ln_f.bias.float().to(device)
                if bool((gamma.abs() < 1e-8).any()):
                    return None
                z = (h - beta) / gamma  # the standardised residual stream
                layer = layers[-1]
                a = layer.self_attn(layer.layer_norm1(z), mask, attention)[0]
                dist = _search_scale(layer, ln_f, z[0], a, proj, projected, target)
            dist[0] = float("inf")  # position 0 is BOS
            hits = (dist <= MATCH_RTOL).nonzero()
            if not len(hits):
                log.debug("[facecond] prompt end not found through the text encoder (closest relative distance "
                          "%.3g)", float(dist.min()))
                return None
            ends.append(int(hits[0]))  # the first matching position
    return max(ends)
