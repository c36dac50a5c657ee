"""Which model family a ComfyUI MODEL is, and the image side it was trained at.

``native_resolution(model) -> int``: SDXL (and its refiner and distilled variants: SSD-1B, Vega, KOALA) 1024, SD 2.x
v-prediction (768-v) 768, SD1.x and SD 2.x-base 512 — the sizes the checkpoints were trained at (Rombach et al. 2022;
Stability AI's SD 2 model cards; Podell et al. 2023, "SDXL"). Every training or working resolution in the pack
defaults to it (a widget value of 0 = "the model's native size").
``family_name(model) -> str``: "SD1.5", "SD2", "SD2-v", "SDXL" or ComfyUI's config class name for others.
``resolve_resolution(value, model, node, input) -> int``: a widget value with 0 meaning native, checked.
"""

from __future__ import annotations

import comfy.model_sampling
import comfy.supported_models as supported

NATIVE = {"SD1.5": 512, "SD2": 512, "SD2-v": 768, "SDXL": 1024}


def family_name(model) -> str:
    config = getattr(model.model, "model_config", None)
    if isinstance(config, (supported.SDXL, supported.SDXLRefiner)):
        return "SDXL"
    if isinstance(config, supported.SD20):
        ms = model.get_model_object("model_sampling")
        return "SD2-v" if isinstance(ms, comfy.model_sampling.V_PREDICTION) else "SD2"
    if isinstance(config, supported.SD15):
        return "SD1.5"
    return type(config).__name__


def native_resolution(model) -> int:
    """The image side the checkpoint was trained at (512 for families the pack does not know)."""
    return NATIVE.get(family_name(model), 512)


def resolve_resolution(value: int, model, node: str, input: str = "resolution") -> int:
    """``value`` (a widget: 0 = the model's native size, else a multiple of 8 of at least 64), resolved for ``model``
    (``None``: no model at hand, 0 then means 512, SD1.5's size)."""
    size = int(value) if value else (native_resolution(model) if model is not None else 512)
    if size < 64 or size % 8:
        raise ValueError(f"{node}: {input} {size} must be 0 (the model's native size) or a multiple of 8 of at "
                         "least 64.")
    return size


NATIVE_TOOLTIP = "0 = the model's native size (SD1.x and SD 2.x-base 512, SD 2.x-v 768, SDXL 1024)."
