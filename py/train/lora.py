"""LoRA (Hu et al. 2021) on a U-Net's attention Linear layers with plain torch modules and forward hooks.

``y = W x + (α / r) · B A x``, A (r, in) Gaussian-initialised, B (out, r) zero-initialised (so training starts
at the unchanged model). The frozen Linear is not touched: a forward hook adds the low-rank term to its output.
Export uses ComfyUI's LoRA key format, ``lora_unet_<module path with '.' → '_'>.lora_up.weight`` (B),
``.lora_down.weight`` (A) and ``.alpha``, which ComfyUI's LoraLoader maps onto ``diffusion_model.<path>.weight``
(``comfy.lora.model_lora_keys_unet``). Used by the Face0 trainer's cheaper mode (py/train/face0_train.py).
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

# Attention projections of ComfyUI's (and LDM's) BasicTransformerBlock: self- (attn1) and cross-attention (attn2).
DEFAULT_TARGETS = r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$"
BLOCKS = ("input_blocks", "middle_block", "output_blocks")


class LoRALinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.rank, self.alpha = rank, float(alpha)
        self.down = nn.Parameter(torch.randn(rank, in_features) / math.sqrt(in_features))  # A
        self.up = nn.Parameter(torch.zeros(out_features, rank))  # B: zero, so the delta starts at 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.down.t().to(x.dtype)) @ self.up.t().to(x.dtype) * (self.alpha / self.rank)

    def delta_weight(self) -> torch.Tensor:
        return self.up @ self.down * (self.alpha / self.rank)  # (out, in)


class LoRASet(nn.Module):
    """LoRA layers hooked onto the Linear modules of ``unet`` whose names match ``targets`` in ``blocks``."""

    def __init__(self, unet: nn.Module, rank: int = 16, alpha: float | None = None,
                 blocks: tuple[str, ...] = BLOCKS, targets: str = DEFAULT_TARGETS, seed: int = 0):
        super().__init__()
        bad = [b for b in blocks if b not in BLOCKS]
        if bad:
            raise ValueError(f"LoRA blocks {bad} unknown; choose from {BLOCKS}")
        pattern = re.compile(targets)
        found = [(n, m) for n, m in unet.named_modules() if isinstance(m, nn.Linear) and pattern.search("." + n)
                 and n.split(".", 1)[0] in blocks]
        if not found:
            raise ValueError(f"LoRA: no Linear layer of the U-Net matches {targets!r} in blocks {blocks}")
        gen_state = torch.random.get_rng_state()
        try:
            torch.manual_seed(seed)
            self.layers = nn.ModuleDict({n.replace(".", "_"): LoRALinear(m.in_features, m.out_features, rank,
                                                                        rank if alpha is None else alpha)
                                         for n, m in found})
        finally:
            torch.random.set_rng_state(gen_state)
        self.paths = {n.replace(".", "_"): n for n, _ in found}
        self._hooks = [m.register_forward_hook(self._hook(n.replace(".", "_"))) for n, m in found]

    def _hook(self, key: str):
        def hook(module, inputs, output):
            return output + self.layers[key](inputs[0])
        return hook

    def remove(self) -> None:
        """Detach the hooks: the U-Net is back to its own weights."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def comfy_state_dict(self, prefix: str = "lora_unet_") -> dict[str, torch.Tensor]:
        """The LoRA in ComfyUI's key format (float32, CPU)."""
        out = {}
        for key, layer in self.layers.items():
            out[f"{prefix}{key}.lora_up.weight"] = layer.up.detach().float().cpu().contiguous()
            out[f"{prefix}{key}.lora_down.weight"] = layer.down.detach().float().cpu().contiguous()
            out[f"{prefix}{key}.alpha"] = torch.tensor(layer.alpha)
        return out
