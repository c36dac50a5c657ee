"""The trainers' differentiable text forward: a prompt template with the learned pseudo-word vectors at ``{}``,
encoded as ComfyUI encodes it, for one CLIP text encoder (SD1.x CLIP-L, SD2.x OpenCLIP-H) or SDXL's two.

ComfyUI builds the input embeddings (``SDClipModel.process_tokens``, which puts an embedding tensor where the
token list has one); the transformer is then run here with out-of-place residuals, because ComfyUI's
``CLIPLayer`` adds them in place (``x += ...``), which autograd cannot differentiate. Same weights, same ops, the
layer ComfyUI uses (``layer`` / ``layer_idx``, ``CLIPSetLastLayer``'s ``clip.layer_idx``), the final layer norm
where ComfyUI applies it. SDXL (``comfy/sdxl_clip.SDXLClipModel.encode_token_weights``): the context is CLIP-L's
and CLIP-G's penultimate hidden states side by side (77 x (768 + 1280)), and the pooled output is CLIP-G's: its
final layer-normed state at the end token (``CLIPTextModel_.forward``: position ``num_tokens - 1``) through the
text projection (``return_projected_pooled``). The pooled output depends on the pseudo-word too (the end token
attends to it), so it is differentiable w.r.t. the vectors as well. Results equal ComfyUI's encode (tested).
"""

from __future__ import annotations

import torch

from .pseudo_words import add_pseudo_word, text_encoder

MARKER = "<facecondplaceholder>"


def template_tokens(clip, templates: list[str], node: str, k: int = 2) -> list[dict]:
    """Token lists of each template (ComfyUI's ``clip.tokenize``: one list per encoder, keyed "l", "h", "g") with a
    k-vector placeholder embedding where ``{}`` is."""
    probe = add_pseudo_word(clip, MARKER, torch.zeros(k, sum(text_encoder(clip, node).dims)), node)
    out = []
    for t in templates:
        if t.count("{}") != 1:
            raise ValueError(f"{node}: prompt template {t!r} must contain {{}} exactly once (where the person goes).")
        out.append(probe.tokenize(t.replace("{}", MARKER)))
    return out


def _row(chunks, vectors: torch.Tensor, node: str) -> list:
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
    return row


def _forward(sd, row: list, node: str, pooled: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One SDClipModel on one token row with embedded vectors: (1, 77, d) at ComfyUI's output layer, and with
    ``pooled`` its projected pooled output (1, d_proj) as ``SDClipModel.forward`` returns it."""
    from comfy.ldm.modules.attention import optimized_attention_for_device
    from comfy.model_management import cast_to  # comfy.ops.cast_to is an alias marked for removal

    if getattr(sd, "enable_attention_masks", False) or getattr(sd, "zero_out_masked", False):
        raise ValueError(f"{node}: this text encoder uses attention masks; training supports the CLIP text encoders "
                         "of SD1.x, SD2.x and SDXL.")
    if sd.layer not in ("last", "hidden"):
        raise ValueError(f"{node}: text-encoder output layer {sd.layer!r} is not supported (last/hidden).")
    device = sd.transformer.get_input_embeddings().weight.device
    embeds, _, num_tokens, _ = sd.process_tokens([row], device)
    tm = sd.transformer.text_model
    x = embeds + cast_to(tm.embeddings.position_embedding.weight, dtype=embeds.dtype, device=device)
    mask = torch.full((x.shape[1], x.shape[1]), -torch.finfo(x.dtype).max, dtype=x.dtype, device=device).triu_(1)
    attn = optimized_attention_for_device(device, mask=True, small_input=True)  # as CLIPEncoder
    layers = tm.encoder.layers
    stop = len(layers) - 1 if sd.layer == "last" else (sd.layer_idx % len(layers))
    z = None
    for j, layer in enumerate(layers[:len(layers) if pooled else stop + 1]):
        x = x + layer.self_attn(layer.layer_norm1(x), mask, attn)
        x = x + layer.mlp(layer.layer_norm2(x))
        if j == stop:
            z = x
    if sd.layer == "last" or sd.layer_norm_hidden_state:
        z = tm.final_layer_norm(z)
    if not pooled:
        return z.float(), None
    last = tm.final_layer_norm(x)[:, num_tokens[0] - 1]  # CLIPTextModel_: the end token's state
    out = sd.transformer.text_projection(last) if sd.return_projected_pooled else last
    return z.float(), out.float()


def encode_with(clip, tokens, vectors: torch.Tensor, node: str = "TrainCelebBasis"):
    """Encode ``tokens`` (one entry of ``template_tokens`` with k = len(vectors)) with the placeholder's k entries
    replaced by ``vectors`` (K, sum of d), differentiably w.r.t. ``vectors`` (pass a ``trainable_clip`` in the
    server). One encoder: the (1, 77, d) context. SDXL: (context (1, 77, 2048), pooled (1, 1280)), the pair
    ComfyUI's CLIPTextEncode gives (the pooled output goes into the U-Net's ``y``)."""
    enc = text_encoder(clip, node)
    clip.cond_stage_model.reset_clip_options()
    if clip.layer_idx is not None:
        clip.cond_stage_model.set_clip_options({"layer": clip.layer_idx})
    clip.load_model()
    if len(enc.parts) == 1:
        return _forward(enc.parts[0].module, _row(tokens[next(iter(tokens))], vectors, node), node, False)[0]
    outs = []
    for part, v in zip(enc.parts, torch.split(vectors, enc.dims, dim=-1), strict=True):
        outs.append(_forward(part.module, _row(tokens[part.key.removeprefix("clip_")], v, node), node,
                             pooled=part.key == "clip_g"))
    cut = min(z.shape[1] for z, _ in outs)  # as SDXLClipModel.encode_token_weights
    return torch.cat([z[:, :cut] for z, _ in outs], dim=-1), outs[-1][1]
