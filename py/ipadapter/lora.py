"""The LoRA of IP-Adapter FaceID files, mapped onto the U-Net's attention weights.

IP-Adapter FaceID (Ye et al. 2023, arXiv 2308.06721; h94/IP-Adapter-FaceID, ``ip-adapter-faceid_sd15.bin``) trains,
besides the image projection and W'_k, W'_v, a LoRA (rank 128 in the public SD1.5 file) on the q, k, v and out
projections of every attention: ``<n>.to_q_lora.down.weight`` / ``up.weight`` (also to_k, to_v, to_out) under
``ip_adapter``. ``n`` counts diffusers' attention processors: two per transformer block, self-attention (attn1,
even n) then cross-attention (attn2, odd n), blocks in the order input blocks, output blocks, middle block — the
order whose odd entries hold ``to_k_ip`` / ``to_v_ip`` (``adapter.py``). Its processors add
``scale · up(down(x))`` to each projection's output with no network alpha, so the patch is

    W <- W + strength · up @ down        (up: (out, rank), down: (rank, in); strength 1 = as trained)

and because the q LoRA is inside the projection and the out LoRA after the attention, folding it into the weights
gives the same decoupled cross-attention as the trained processors. Pure mapping; no ComfyUI imports.
"""

from __future__ import annotations

import re

import torch

PROJECTIONS = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}  # file name -> U-Net module
_KEY = re.compile(r"ip_adapter\.(\d+)\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight")

# SD1.5's 16 transformer blocks in processor order (block n holds processors 2n and 2n+1), as the ComfyUI U-Net
# state-dict prefixes: input blocks 1, 2, 4, 5, 7, 8, output blocks 3..11, the middle block; the transformer is the
# second module (.1) of each block.
SD15_BLOCKS = tuple(f"diffusion_model.{part}.1.transformer_blocks.0" for part in (
    *(f"input_blocks.{i}" for i in (1, 2, 4, 5, 7, 8)), *(f"output_blocks.{i}" for i in range(3, 12)), "middle_block"))


def lora_weights(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The FaceID LoRA tensors of a flat IP-Adapter state dict, keyed ``<n>.to_q_lora.down.weight`` etc. (the
    ``ip_adapter.`` prefix dropped). Raises ValueError when a projection has only one of its down/up pair."""
    out = {k[len("ip_adapter."):]: v for k, v in sd.items() if _KEY.fullmatch(k)}
    for k in out:
        twin = k.replace(".down.", ".up.") if ".down." in k else k.replace(".up.", ".down.")
        if twin not in out:
            raise ValueError(f"IP-Adapter LoRA: {k} has no {twin.rsplit('.', 2)[-2]} weight; the file is incomplete. "
                             "Download it again from h94/IP-Adapter-FaceID.")
    return out


def processors(lora: dict[str, torch.Tensor]) -> list[int]:
    """The attention-processor indices the LoRA touches, sorted."""
    return sorted({int(k.split(".", 1)[0]) for k in lora})


def rank(lora: dict[str, torch.Tensor]) -> int:
    """The largest LoRA rank in the file (0 without LoRA)."""
    return max((v.shape[0] for k, v in lora.items() if k.endswith(".down.weight")), default=0)


def key_map(lora: dict[str, torch.Tensor], blocks: list[str] | tuple[str, ...]) -> dict[str, str]:
    """``{"<n>.to_q": "<block>.attn1.to_q.weight", ...}`` for every LoRA pair: processor n sits in transformer block
    ``blocks[n // 2]`` (U-Net state-dict prefixes in processor order, e.g. ``SD15_BLOCKS``), attn1 for even n and
    attn2 for odd n. Raises ValueError when the file has processors the U-Net lacks (another base model)."""
    found = processors(lora)
    if found and found[-1] >= 2 * len(blocks):
        raise ValueError(f"IP-Adapter LoRA: the file has attention processors up to {found[-1]} but the model has "
                         f"{len(blocks)} transformer blocks ({2 * len(blocks)} processors): it was made for another "
                         "base model (SD1.5 FaceID files need an SD1.5 checkpoint).")
    out = {}
    for k in lora:
        if not k.endswith(".down.weight"):
            continue
        n, proj = k.split(".", 1)[0], k.split(".")[1][: -len("_lora")]
        out[f"{n}.{proj}"] = f"{blocks[int(n) // 2]}.attn{1 + int(n) % 2}.{PROJECTIONS[proj]}.weight"
    return out


def check_shapes(lora: dict[str, torch.Tensor], keys: dict[str, str], shapes: dict[str, tuple[int, ...]]) -> None:
    """Each pair's up @ down must have the shape of the weight it patches (``shapes``: U-Net key -> shape) and
    down/up must agree on the rank; ValueError naming the first mismatch otherwise."""
    for prefix, target in keys.items():
        down, up = lora[f"{prefix}_lora.down.weight"], lora[f"{prefix}_lora.up.weight"]
        want = tuple(shapes[target])
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0] or (up.shape[0], down.shape[1]) != want:
            raise ValueError(f"IP-Adapter LoRA: {prefix}_lora (up {tuple(up.shape)}, down {tuple(down.shape)}) does "
                             f"not fit {target} {want}: the file was made for another base model.")
