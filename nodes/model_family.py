"""Which model family a ComfyUI MODEL is, and the image side it was trained at.

``native_resolution(model) -> int``: SDXL (and its refiner and distilled variants: SSD-1B, Vega, KOALA) 1024, SD 2.x
v-prediction (768-v) 768, SD1.x and SD 2.x-base 512 — the sizes the checkpoints were trained at (Rombach et al. 2022;
Stability AI's SD 2 model cards; Podell et al. 2023, "SDXL"). Every training or working resolution in the pack
defaults to it (a widget value of 0 = "the model's native size").
``family_name(model) -> str``: "SD1.5", "SD2", "SD2-v", "SDXL" or ComfyUI's config class name for others.
``resolve_resolution(value, model, node, input) -> int``: a widget value with 0 meaning native, checked.
``checkpoint_native_resolution(path) -> int``: the same for a checkpoint file, from its U-Net keys (ComfyUI's own
detection) without building the model (the CLIs that only need its VAE).
"""

from __future__ import annotations

import comfy.model_sampling
import comfy.supported_models as supported

NATIVE = {"SD1.5": 512, "SD2": 512, "SD2-v": 768, "SDXL": 1024}


def _family(config, v_prediction) -> str:
    if isinstance(config, (supported.SDXL, supported.SDXLRefiner)):
        return "SDXL"
    if isinstance(config, supported.SD20):
        return "SD2-v" if v_prediction() else "SD2"
    if isinstance(config, supported.SD15):
        return "SD1.5"
    return type(config).__name__


def family_name(model) -> str:
    return _family(getattr(model.model, "model_config", None), lambda: isinstance(
        model.get_model_object("model_sampling"), comfy.model_sampling.V_PREDICTION))


def family_of_width(width: int) -> str:
    """The model family whose text context is ``width`` wide (e.g. an IP-Adapter's W'_k input width)."""
    return {768: "SD1.5", 1024: "SD2", 2048: "SDXL"}.get(int(width), f"{width}-wide-context")


def native_resolution(model) -> int:
    """The image side the checkpoint was trained at (512 for families the pack does not know)."""
    return NATIVE.get(family_name(model), 512)


def checkpoint_native_resolution(path) -> int:
    """``native_resolution`` of the checkpoint file at ``path`` (512 for one ComfyUI does not recognise)."""
    import comfy.model_base
    import comfy.model_detection
    import comfy.utils

    sd = comfy.utils.load_torch_file(str(path))
    prefix = comfy.model_detection.unet_prefix_from_state_dict(sd)
    config = comfy.model_detection.model_config_from_unet(sd, prefix)
    if config is None:
        return 512
    return NATIVE.get(_family(config, lambda: config.model_type(sd, prefix) == comfy.model_base.ModelType.V_PREDICTION),
                      512)


def resolve_resolution(value: int, model, node: str, input: str = "resolution") -> int:
    """``value`` (a widget: 0 = the model's native size, else a multiple of 8 of at least 64), resolved for ``model``
    (``None``: no model at hand, 0 then means 512, SD1.5's size)."""
    size = int(value) if value else (native_resolution(model) if model is not None else 512)
    if size < 64 or size % 8:
        raise ValueError(f"{node}: {input} {size} must be 0 (the model's native size) or a multiple of 8 of at "
                         "least 64.")
    return size


NATIVE_TOOLTIP = "0 = the model's native size (SD1.x and SD 2.x-base 512, SD 2.x-v 768, SDXL 1024)."
