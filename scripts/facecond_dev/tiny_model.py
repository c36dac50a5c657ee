"""A tiny but real SD1.5-layout checkpoint that ComfyUI loads as SD1.5.

U-Net: ComfyUI's own ``UNetModel`` with ``model_channels=320``, ``context_dim=768``, one level, one res
block, one transformer, no middle block (13.6M params). CLIP: full CLIP-L text-encoder shape (ComfyUI's
``sd1_clip_config.json``). VAE: TAESD keys, so ComfyUI decodes with TAESD; the real TAESD weights are
used when given, random ones otherwise. Everything else is filled with seeded random values, so the
same seed always writes the same file. Must run with ComfyUI importable (``host.import_comfy``).

The tiny ControlNet (``write_tiny_controlnet``) is ComfyUI's own ``comfy.cldm.cldm.ControlNet`` on the same layout
(hint: 3-channel image), seeded random weights (zero convs included, so it has an effect), in the original
``control_model.`` key format that ``comfy.controlnet.load_controlnet`` detects as an SD1.5 ControlNet.
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


def write_tiny_checkpoint(path: str | os.PathLike, taesd_dir: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """Write the checkpoint to ``path`` (atomically) unless a file is already there; returns the path."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    sd = build_state_dict(taesd_dir, seed)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp), metadata={"facecond": "tiny random SD1.5"})
    os.replace(tmp, path)
    log.info("wrote tiny SD1.5 checkpoint %s (%d tensors)", path, len(sd))
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
