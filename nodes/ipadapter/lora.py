"""The FaceID LoRA of an IP-Adapter file, applied to a cloned model as ComfyUI weight patches.

The mapping (attention processor -> U-Net weight) is ``py/ipadapter/lora.py``; here the U-Net's transformer blocks
are listed in processor order, the file's pairs become ComfyUI LoRA patches through ``comfy.lora.load_lora`` (the
``<x>_lora.up.weight`` / ``_lora.down.weight`` layout it already reads, no alpha: scale 1) and are added with
``ModelPatcher.add_patches`` to the clone ApplyIPAdapter returns, so the user's model is never touched and ComfyUI's
model management patches and restores the weights around sampling.
"""

from __future__ import annotations

import logging

import comfy.ldm.modules.attention as comfy_attention
import comfy.lora

from ...py.ipadapter import adapter as ipa
from ...py.ipadapter import lora as ipa_lora

log = logging.getLogger("facecond")

APPLIED = "facecond_ipadapter_lora"  # model_options key: names of the adapters whose LoRA the model already holds


def transformer_blocks(unet) -> list[str]:
    """State-dict prefixes (``diffusion_model.input_blocks.1.1.transformer_blocks.0``...) of a U-Net's transformer
    blocks in attention-processor order: input blocks, output blocks, middle block (as ``cross_attention_layers``)."""
    out = []
    middle = getattr(unet, "middle_block", None)
    groups = [("input_blocks", getattr(unet, "input_blocks", [])),
              ("output_blocks", getattr(unet, "output_blocks", [])),
              ("middle_block", [middle] if middle is not None else [])]
    for part, blocks in groups:
        for i, block in enumerate(blocks):
            where = f"{part}.{i}" if part != "middle_block" else part
            for name, mod in block.named_modules():
                if isinstance(mod, comfy_attention.SpatialTransformer):
                    out += [f"diffusion_model.{where}.{name}.transformer_blocks.{j}"
                            for j in range(len(mod.transformer_blocks))]
    return out


def apply_lora(node: str, m, adapter: ipa.IPAdapter, strength: float) -> int:
    """Add the adapter's LoRA to ``m`` (a clone) with ``strength``; returns the number of weights patched (0 when
    the file has none, strength is 0, or an earlier ApplyIPAdapter already put this adapter's LoRA on the model)."""
    if not adapter.lora or strength == 0:
        return 0
    if adapter.name in m.model_options.get(APPLIED, ()):  # a second region / person: the LoRA goes on once
        log.info("[facecond] %s: the LoRA of %s is already on this model; not applied twice.", node, adapter.name)
        return 0
    unet = m.get_model_object("diffusion_model")
    try:
        keys = ipa_lora.key_map(adapter.lora, transformer_blocks(unet))
        shapes = {k: tuple(unet.get_parameter(k[len("diffusion_model."):]).shape) for k in keys.values()}
        ipa_lora.check_shapes(adapter.lora, keys, shapes)
    except ValueError as e:
        raise ValueError(f"{node}: {adapter.name}: {e}") from None
    patches = comfy.lora.load_lora(adapter.lora, keys, log_missing=False)
    done = m.add_patches(patches, strength)
    if len(done) != len(keys):
        raise RuntimeError(f"{node}: only {len(done)} of {len(keys)} LoRA weights of {adapter.name} found a place "
                           "in the model; it was made for another model family (an SD1.5 FaceID file needs an SD1.5 "
                           "checkpoint, an SDXL one an SDXL checkpoint).")
    m.model_options[APPLIED] = (*m.model_options.get(APPLIED, ()), adapter.name)
    log.info("[facecond] %s: LoRA of %s on %d attention weights (rank %d, strength %g).", node, adapter.name,
             len(done), ipa_lora.rank(adapter.lora), strength)
    return len(done)
