"""A tiny but real SD1.5-layout checkpoint that ComfyUI loads as SD1.5.

U-Net: ComfyUI's own ``UNetModel`` with ``model_channels=320``, ``context_dim=768``, one level, one res
block, one transformer, no middle block (13.6M params). CLIP: full CLIP-L text-encoder shape (ComfyUI's
``sd1_clip_config.json``). VAE: TAESD keys, so ComfyUI decodes with TAESD; the real TAESD weights are
used when given, random ones otherwise. Everything else is filled with seeded random values, so the
same seed always writes the same file. Must run with ComfyUI importable (``host.import_comfy``).

The tiny ControlNet (``write_tiny_controlnet``) is ComfyUI's own ``comfy.cldm.cldm.ControlNet`` on the same layout
(hint: 3-channel image), seeded random weights (zero convs included, so it has an effect), in the original
``control_model.`` key format that ``comfy.controlnet.load_controlnet`` detects as an SD1.5 ControlNet.

The other families (``write_tiny_checkpoint(..., family=...)``, layouts in ``FAMILY_UNETS``) are built the same way:
each U-Net is the smallest layout ``comfy/model_detection.py`` + ``comfy/supported_models.py`` (identical in ComfyUI
0.3.75 and 0.28) still match to that family, with the full-size text encoders its ``clip_target`` fixes, saved in
the key format ``CheckpointLoaderSimple`` reads (the model config's own ``process_clip_state_dict_for_saving``):

- ``sd2``  (SD20, EPS): the SD1.5 layout with context 1024, linear proj_in/out, 64-channel heads; OpenCLIP-H.
- ``sd2v`` (SD20, V_PREDICTION): ComfyUI tells v-prediction from the std (> 0.09) of
  ``output_blocks.11.1.transformer_blocks.0.norm1.bias``, so the U-Net needs a 12th output block with a transformer:
  one level of 11 res blocks (24.6M params), that bias at std 0.2; OpenCLIP-H.
- ``sdxl`` (SDXL, EPS): SDXL's block layout (3 levels x 2 res blocks, transformer depths [0,0,2,2,10,10], middle 10,
  output [0,0,0,2,2,2,10,10,10]: the 70 cross-attention layers an SDXL IP-Adapter patches), context 2048, ADM 2816,
  but 320 channels at every level (``channel_mult`` [1,1,1]); CLIP-L + CLIP-G (with its text projection). The VAE is
  TAESD-shaped with random weights (no taesdxl in the shared data).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

UNET_CONFIG = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1], channel_mult=[1],
    transformer_depth=[1], transformer_depth_output=[1, 1], transformer_depth_middle=-2, context_dim=768,
    use_spatial_transformer=True, use_linear_in_transformer=False, num_heads=8, legacy=False,
)


def _fill(state: dict[str, torch.Tensor], gen: torch.Generator, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Seeded values in the ranges a trained net has: norms at 1/0, weights ~N(0, 1/fan_in), biases 0."""
    out = {}
    for name in sorted(state):
        shape = state[name].shape
        if name.endswith("position_ids"):
            t = torch.arange(shape[-1]).expand(shape).clone()
            out[name] = t
            continue
        leaf = name.rsplit(".", 1)[-1]
        is_norm = any(s in name for s in ("norm", "ln_", "layer_norm"))
        if leaf == "bias":
            t = torch.zeros(shape)
        elif is_norm and leaf == "weight":
            t = torch.ones(shape)
        else:
            fan_in = int(torch.tensor(shape[1:]).prod()) if len(shape) > 1 else shape[0]
            t = torch.randn(shape, generator=gen) / max(fan_in, 1) ** 0.5
        out[name] = t.to(dtype)
    return out


def _meta_state(module_factory) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        module = module_factory()
    return dict(module.state_dict())


def build_state_dict(taesd_dir: str | os.PathLike | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    import comfy.ops
    from comfy.clip_model import CLIPTextModel
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from comfy.taesd.taesd import TAESD

    gen = torch.Generator().manual_seed(seed)
    ops = comfy.ops.disable_weight_init
    sd: dict[str, torch.Tensor] = {}

    unet = _meta_state(lambda: UNetModel(**UNET_CONFIG, dtype=torch.float16, device="meta", operations=ops))
    sd.update({f"model.diffusion_model.{k}": v for k, v in _fill(unet, gen, torch.float16).items()})

    clip_cfg = json.loads((Path(comfy.ops.__file__).parent / "sd1_clip_config.json").read_text())
    clip = _meta_state(lambda: CLIPTextModel(clip_cfg, torch.float16, "meta", ops))
    clip.pop("text_projection.weight", None)  # SD1.x checkpoints carry no text projection
    sd.update({f"cond_stage_model.transformer.{k}": v for k, v in _fill(clip, gen, torch.float16).items()})

    taesd = _meta_state(TAESD)
    taesd = {k: v for k, v in taesd.items() if k.startswith(("taesd_encoder.", "taesd_decoder."))}
    values = _fill(taesd, gen, torch.float32)
    if taesd_dir is not None:
        from safetensors.torch import load_file

        for part in ("encoder", "decoder"):
            real = load_file(str(Path(taesd_dir) / f"taesd_{part}.safetensors"))
            values.update({f"taesd_{part}.{k}": v.float() for k, v in real.items()})
    values.update({"vae_scale": torch.tensor(1.0), "vae_shift": torch.tensor(0.0)})
    sd.update({f"first_stage_model.{k}": v for k, v in values.items()})
    return sd


_SD2_UNET = dict(UNET_CONFIG, context_dim=1024, use_linear_in_transformer=True, num_heads=-1, num_head_channels=64)
FAMILY_UNETS = {
    "sd15": UNET_CONFIG,
    "sd2": _SD2_UNET,
    "sd2v": dict(_SD2_UNET, num_res_blocks=[11], transformer_depth=[1] + [0] * 10,
                 transformer_depth_output=[1] + [0] * 11),  # popped from the end: output block 11 gets the 1
    "sdxl": dict(_SD2_UNET, num_res_blocks=[2, 2, 2], channel_mult=[1, 1, 1], transformer_depth=[0, 0, 2, 2, 10, 10],
                 transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], transformer_depth_middle=10,
                 context_dim=2048, num_classes="sequential", adm_in_channels=2816),
}
FAMILIES = tuple(FAMILY_UNETS)
FAMILY_NAMES = {"sd15": "SD1.5", "sd2": "SD2-base", "sd2v": "SD2-v", "sdxl": "SDXL"}
V_PRED_KEY = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"  # ComfyUI's SD20.model_type


def _check_family(family: str) -> None:
    if family not in FAMILY_UNETS:
        raise ValueError(f"unknown tiny checkpoint family {family!r}: one of {', '.join(FAMILIES)}")


def build_family_state_dict(family: str, taesd_dir: str | os.PathLike | None = None,
                            seed: int = 0) -> dict[str, torch.Tensor]:
    """The state dict of the tiny ``family`` checkpoint (``sd15`` is ``build_state_dict``, unchanged)."""
    _check_family(family)
    if family == "sd15":
        return build_state_dict(taesd_dir, seed)
    import comfy.ops
    import comfy.supported_models as supported
    from comfy.clip_model import CLIPTextModel
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from comfy.taesd.taesd import TAESD

    gen = torch.Generator().manual_seed(seed)
    ops = comfy.ops.disable_weight_init
    config = FAMILY_UNETS[family]
    sd: dict[str, torch.Tensor] = {}
    unet = _meta_state(lambda: UNetModel(**config, dtype=torch.float16, device="meta", operations=ops))
    sd.update({f"model.diffusion_model.{k}": v for k, v in _fill(unet, gen, torch.float16).items()})
    if family == "sd2v":  # v-prediction is told from this bias's spread (supported_models.SD20.model_type)
        shape = sd[V_PRED_KEY].shape
        sd[V_PRED_KEY] = (0.2 * torch.randn(shape, generator=gen)).to(torch.float16)

    # Text encoders in ComfyUI's own naming (clip_h / clip_l / clip_g .transformer.), then the family's saving
    # conversion gives the checkpoint format (OpenCLIP resblocks for H and G, HF for SDXL's CLIP-L).
    comfy_dir = Path(comfy.ops.__file__).parent
    encoders = {"sd2": {"clip_h": "text_encoders/sd2_clip_config.json"},
                "sd2v": {"clip_h": "text_encoders/sd2_clip_config.json"},
                "sdxl": {"clip_l": "sd1_clip_config.json", "clip_g": "clip_config_bigg.json"}}[family]
    clip_sd: dict[str, torch.Tensor] = {}
    for name, cfg_file in encoders.items():
        cfg = json.loads((comfy_dir / cfg_file).read_text())
        clip = _meta_state(lambda cfg=cfg: CLIPTextModel(cfg, torch.float16, "meta", ops))
        clip_sd.update({f"{name}.transformer.{k}": v for k, v in _fill(clip, gen, torch.float16).items()})
    model_config = (supported.SDXL if family == "sdxl" else supported.SD20)(dict(config))
    sd.update(model_config.process_clip_state_dict_for_saving(clip_sd))

    taesd = {k: v for k, v in _meta_state(TAESD).items() if k.startswith(("taesd_encoder.", "taesd_decoder."))}
    values = _fill(taesd, gen, torch.float32)
    if taesd_dir is not None and family != "sdxl":  # TAESD is the SD1/SD2 latent space's; SDXL's is taesdxl
        from safetensors.torch import load_file

        for part in ("encoder", "decoder"):
            real = load_file(str(Path(taesd_dir) / f"taesd_{part}.safetensors"))
            values.update({f"taesd_{part}.{k}": v.float() for k, v in real.items()})
    scale = 0.13025 if family == "sdxl" else 0.18215  # as ComfyUI's VAELoader sets them for taesdxl / taesd
    values.update({"vae_scale": torch.tensor(scale), "vae_shift": torch.tensor(0.0)})
    sd.update({f"first_stage_model.{k}": v for k, v in values.items()})
    return sd


def write_tiny_checkpoint(path: str | os.PathLike, taesd_dir: str | os.PathLike | None = None, seed: int = 0,
                          family: str = "sd15") -> Path:
    """Write the ``family`` checkpoint to ``path`` (atomically) unless a file is already there; returns the path."""
    from safetensors.torch import save_file

    _check_family(family)
    path = Path(path)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # sd15 keeps its historical temp name (its bytes are pinned); the others are big, so one temp file per writer
    tmp = path.with_name(path.name + ".part" if family == "sd15" else f"{path.name}.{os.getpid()}.part")
    sd = build_family_state_dict(family, taesd_dir, seed)
    label = FAMILY_NAMES[family] if family != "sd15" else "SD1.5"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp), metadata={"facecond": f"tiny random {label}"})
    os.replace(tmp, path)
    log.info("wrote tiny %s checkpoint %s (%d tensors)", label, path, len(sd))
    return path


def build_controlnet_state_dict(seed: int = 1) -> dict[str, torch.Tensor]:
    import comfy.ops
    from comfy.cldm.cldm import ControlNet

    config = {k: v for k, v in UNET_CONFIG.items() if k != "out_channels"}  # as comfy.controlnet builds it
    net = _meta_state(lambda: ControlNet(**config, hint_channels=3, dtype=torch.float16, device="meta",
                                         operations=comfy.ops.disable_weight_init))
    return {f"control_model.{k}": v for k, v in _fill(net, torch.Generator().manual_seed(seed), torch.float16).items()}


def write_tiny_controlnet(path: str | os.PathLike, seed: int = 1) -> Path:
    """Write the tiny ControlNet (10.5M params, 21 MB) to ``path`` (atomically) unless a file is already there."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.part")
    sd = build_controlnet_state_dict(seed)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp), metadata={"facecond": "tiny random SD1.5 cnet"})
    os.replace(tmp, path)
    log.info("wrote tiny SD1.5 ControlNet %s (%d tensors)", path, len(sd))
    return path
