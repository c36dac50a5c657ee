"""Face0 training core (Valevski et al. 2023, §3): the projection trained jointly with the U-Net.

Pure torch; the ComfyUI model comes in duck-typed (``base.apply_model(x, sigma, c_crossattn=...)`` returning the
denoised latent for ε and v models alike, ``base.model_sampling.sigmas``, ``base.diffusion_model``). The CLI
(scripts/face0_train.py) loads the checkpoint and runs the loop with Hugging Face accelerate.

- Loss: the shared ``core.denoising_loss`` (ε-MSE, x_t = x0 + σ·ε over the model's σ table); a
  v-prediction checkpoint predicts through its own parameterisation (ComfyUI's model_sampling), the loss
  stays the paper's ε-MSE.
- Face dropout: 10% of rows get zero tokens through ``projection.face_tokens(..., drop=mask)``, the exact
  "no face" input the sampler (ProjectToContext) uses. The text is never dropped (paper).
- Randomness: one generator per (seed, micro-step, rank) from ``core.step_generator``, so a resumed run
  draws what the uninterrupted run drew; data order is a function of (seed, epoch, rank) too.
- State: one safetensors file (trainable params, EMA, AdamW tensors, JSON metadata); no pickle.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass

import torch
from safetensors import safe_open
from torch import nn

from ..face0.projection import PRESETS as PROJECTION_PRESETS
from ..face0.projection import Face0Projection, face_tokens, override_tokens
from ..weights.atomic import save_file
from .core import (
    denoising_loss,
    load_optimizer_state,
    optimizer_state,
    sample_noise,
    sample_sigmas,
    step_generator,
)
from .denoiser import adm_vector, denoise, needs_adm
from .face0_data import decode_sample, iter_shard, shard_keys
from .lora import LoRASet

STATE_FORMAT = "facecond.face0_train_state.v1"
# ComfyUI model-config class -> the projection's base_model. SDXL's U-Net also takes the ADM vector y (pooled CLIP-G
# output + original size, crop, target size: Podell et al. 2023 sec. 2.2), built per batch by ``batch_adm`` from the
# shards' ``original_size`` / ``crop_top_left`` (face0_data) and the caption's pooled output.
FAMILIES = {"SD15": "sd1", "SD20": "sd2", "SD21UnclipL": "sd2", "SD21UnclipH": "sd2", "SDXL": "sdxl"}
PREDICTIONS = ("EPS", "V_PREDICTION")


def check_family(config_name: str, prediction: str, context_dim: int, where: str = "face0_train") -> str:
    """The projection's base_model for a checkpoint, or ValueError saying why it cannot be trained here."""
    if config_name not in FAMILIES:
        raise ValueError(f"{where}: the checkpoint is a {config_name} model; Face0 training supports SD1.x, SD2.x "
                         f"and SDXL checkpoints ({', '.join(FAMILIES)}). Use one of those.")
    if prediction not in PREDICTIONS:
        raise ValueError(f"{where}: the checkpoint's prediction type is {prediction}; the denoising loss supports "
                         f"{' and '.join(PREDICTIONS)} models.")
    return FAMILIES[config_name]


@dataclass(frozen=True)
class Face0TrainConfig:
    steps: int = 500_000  # paper: 500K steps
    batch: int = 4  # per process and micro-step; global batch = batch · accum · processes (paper: 256)
    accum: int = 1  # gradient accumulation micro-steps per optimiser step
    lr: float = 2e-5  # paper
    warmup: int = 0  # linear LR warm-up steps
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    ema_decay: float = 0.9999  # paper; with warm-up min(decay, (1+t)/(10+t)) so short runs move too
    face_drop: float = 0.1  # paper: projected embedding zeroed 10% of the time
    mode: str = "full"  # "full": projection + whole U-Net; "lora": projection + LoRA on chosen blocks
    lora_rank: int = 16
    lora_alpha: float = 16.0
    lora_blocks: tuple[str, ...] = ("input_blocks", "middle_block", "output_blocks")
    seed: int = 0
    proj_hidden: int = 768  # a fresh projection's width h and Linear layers L (py/face0/projection.py PRESETS)
    proj_depth: int = 4

    def __post_init__(self):
        if self.mode not in ("full", "lora"):
            raise ValueError(f"mode must be 'full' or 'lora', got {self.mode!r}")
        if self.batch < 1 or self.accum < 1 or self.lr <= 0 or not 0 <= self.face_drop < 1:
            raise ValueError(f"Face0TrainConfig: need batch, accum >= 1, lr > 0, 0 <= face_drop < 1; got {self}")


# Run presets of scripts/face0_train.py (--preset). "paper": Face0 §2.3 (Valevski et al. 2023): lr 2e-5, batch 256,
# 500K steps, EMA 0.9999, 10% face dropout, the ~10M-parameter projection; the global batch of 256 is reached by
# gradient accumulation: accum = 256 / (micro-batch · processes). "small": a short single-GPU run (the default).
PRESETS: dict[str, dict] = {
    "small": {"steps": 10_000, "batch": 4, "accum": 1, "global_batch": None, "lr": 2e-5, "ema_decay": 0.9999,
              "face_drop": 0.1, "proj": "small"},
    "paper": {"steps": 500_000, "batch": 4, "accum": None, "global_batch": 256, "lr": 2e-5, "ema_decay": 0.9999,
              "face_drop": 0.1, "proj": "paper"},
}


def expand_preset(name: str, processes: int = 1, **given) -> dict:
    """The run settings of preset ``name`` with every value in ``given`` that is not None taking precedence.

    Returns steps, batch (per process and micro-step), accum, global_batch (= batch·accum·processes), lr,
    ema_decay, face_drop, proj_hidden, proj_depth. A preset with a global batch derives accum from it
    (unless accum is given); ValueError when batch·processes does not divide it.
    """
    if name not in PRESETS:
        raise ValueError(f"face0_train: unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    p = PRESETS[name]
    out = {k: p[k] for k in ("steps", "batch", "accum", "lr", "ema_decay", "face_drop")}
    out |= {f"proj_{k}": v for k, v in PROJECTION_PRESETS[p["proj"]].items()}
    out |= {k: v for k, v in given.items() if v is not None}
    if out.get("accum") is None:
        per_step = out["batch"] * processes
        if p["global_batch"] % per_step:
            raise ValueError(f"face0_train: preset {name!r} needs a global batch of {p['global_batch']}, which "
                             f"batch {out['batch']} x {processes} process(es) does not divide; pick --batch so that "
                             f"batch x processes divides {p['global_batch']}, or give --accum")
        out["accum"] = p["global_batch"] // per_step
    out["global_batch"] = out["batch"] * out["accum"] * processes
    return out


class Face0Model(nn.Module):
    """Projection + the ComfyUI diffusion model (+ LoRA): forward = the denoiser with the face in the context."""

    def __init__(self, proj: Face0Projection, base: nn.Module, cfg: Face0TrainConfig):
        super().__init__()
        self.proj, self.base = proj.train(), base
        for p in base.parameters():
            p.requires_grad_(False)
        self.lora = None
        if cfg.mode == "lora":
            self.lora = LoRASet(base.diffusion_model, cfg.lora_rank, cfg.lora_alpha, tuple(cfg.lora_blocks),
                                seed=cfg.seed)
        else:
            for p in base.diffusion_model.parameters():
                p.requires_grad_(True)
        for p in proj.parameters():
            p.requires_grad_(True)

    def forward(self, x_t, sigma, context, embeds, drop, y=None):
        tokens = face_tokens(self.proj, embeds, drop=drop)  # (B, K, W); dropped rows → zeros
        ctx = override_tokens(context, tokens)  # the last K tokens of each 77-token chunk
        return denoise(self.base, x_t, sigma, ctx, y=y)

    def trainable(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}


def micro_generator(seed: int, micro_step: int, rank: int, world: int) -> torch.Generator:
    return step_generator(seed, micro_step * world + rank)


def draw(x0: torch.Tensor, sigmas: torch.Tensor, gen: torch.Generator, face_drop: float):
    """A micro-batch's random draws, in this order: σ (B,) uniform over the table, ε ~ N(0, I), dropout mask (B,)."""
    b = x0.shape[0]
    sigma, _ = sample_sigmas(sigmas, b, gen)
    noise = sample_noise(x0, gen)
    drop = torch.rand(b, generator=gen) < face_drop  # (B,)
    return sigma, noise, drop


def drawn_loss(model, x0, context, embeds, sigma, noise, drop, y=None) -> torch.Tensor:
    """The ε-MSE (core) of one micro-batch for given draws (mean over the batch); ``y``: SDXL's ADM vectors."""
    def denoise(x, s, ctx):
        if y is None:  # SD1.x / SD2.x: the call made before SDXL support, unchanged
            return model(x, s, ctx, embeds, drop.to(x.device))
        return model(x, s, ctx, embeds, drop.to(x.device), y)

    return denoising_loss(denoise, x0, context, sigma.to(x0.device), noise, prediction="x0")


def face0_loss(model, x0, context, embeds, sigmas, gen: torch.Generator, face_drop: float,
               y: torch.Tensor | None = None) -> torch.Tensor:
    """One micro-batch: σ uniform over the table, ε ~ N(0, I), face dropout mask, ε-MSE (core)."""
    return drawn_loss(model, x0, context, embeds, *draw(x0, sigmas, gen, face_drop), y=y)


def batch_adm(base, batch: dict, pooled: torch.Tensor | None, side: int) -> torch.Tensor | None:
    """SDXL's ADM vectors y (B, 2816) for a collated batch, one row per sample: the caption's pooled CLIP-G output,
    the photo's original size and the crop's top-left corner as the shard stores them, the target size ``side``
    (the stored square), as SDXL was trained (Podell et al. 2023, sec. 2.2) and as ComfyUI's ``encode_adm`` builds
    it. None for models without class conditioning (SD1.x, SD2.x), whatever the shard holds."""
    if not needs_adm(base):
        return None
    sizes, crops = batch.get("original_sizes"), batch.get("crops_top_left")
    if sizes is None or any(s is None for s in sizes) or any(c is None for c in crops):
        raise ValueError("face0_train: this SDXL checkpoint needs each sample's original size and crop (SDXL's "
                         "micro-conditioning), and the shards were written without them (before SDXL support): "
                         "re-run scripts/face0_prepare.py on the sources")
    return adm_vector(base, pooled, [s[1] for s in sizes], [s[0] for s in sizes], crop_w=[c[1] for c in crops],
                      crop_h=[c[0] for c in crops], target_width=side, target_height=side)


def accumulate(micro_loss: Callable[[int], torch.Tensor], accum: int,
               backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
               no_sync: Callable[[], AbstractContextManager] | None = None) -> float:
    """Gradients of one optimiser step from ``accum`` micro-batches: each micro-batch loss (a mean over its rows)
    is back-propagated divided by ``accum``, so with equal micro-batches the summed gradient is the gradient of
    the mean loss over all of them, the gradient one big batch would give. ``no_sync`` (DDP) wraps every
    micro-step but the last, so processes all-reduce once per step. Returns the mean micro-batch loss."""
    total = 0.0
    for micro in range(accum):
        with (no_sync() if no_sync is not None and micro < accum - 1 else nullcontext()):
            loss = micro_loss(micro)
            backward(loss / accum)
        total += float(loss.detach()) / accum
    return total


class EMA:
    """Exponential moving average of the trainable parameters (Face0 §2.3: EMA 0.9999), after each optimiser step:
    shadow <- d·shadow + (1-d)·param with d = min(decay, (1+t)/(10+t)) at step t, the usual warm-up (so short
    runs move too; from step 89,990 on, d is the paper's 0.9999)."""

    def __init__(self, params: dict[str, torch.Tensor], decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in params.items()}

    @torch.no_grad()
    def update(self, params: dict[str, torch.Tensor], step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for n, p in params.items():
            self.shadow[n].lerp_(p.detach().float(), 1 - d)

    @torch.no_grad()
    def copy_to(self, params: dict[str, torch.Tensor]) -> None:
        for n, p in params.items():
            p.copy_(self.shadow[n].to(p.dtype))


def save_state(path: str, params: dict[str, torch.Tensor], ema: EMA, optimizer: torch.optim.Optimizer,
               step: int, cfg: Face0TrainConfig, extra: dict) -> None:
    tensors = {f"param.{n}": p.detach().float().cpu().contiguous() for n, p in params.items()}
    tensors.update({f"ema.{n}": t.cpu().contiguous() for n, t in ema.shadow.items()})
    optim, groups = optimizer_state(optimizer)
    tensors.update(optim)
    meta = {"format": STATE_FORMAT, "step": step, "config": asdict(cfg), "param_names": list(params),
            "param_groups": groups, "extra": extra}
    save_file(tensors, path, metadata={"facecond_face0_state": json.dumps(meta)})


def load_state(path: str, params: dict[str, torch.Tensor], ema: EMA, optimizer: torch.optim.Optimizer) -> dict:
    """Restore params, EMA and optimizer in place; returns the metadata (``step``, ``extra`` ...)."""
    with safe_open(path, framework="pt") as f:
        raw = (f.metadata() or {}).get("facecond_face0_state")
        if raw is None:
            raise ValueError(f"{path} is not a Face0 trainer state (no 'facecond_face0_state' metadata)")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta = json.loads(raw)
    if meta["param_names"] != list(params):
        raise ValueError(f"{path}: state is for other parameters (mode or LoRA blocks changed?): "
                         f"{len(meta['param_names'])} saved vs {len(params)} now")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[f"param.{n}"].to(p.device, p.dtype))
            ema.shadow[n] = tensors[f"ema.{n}"].to(ema.shadow[n].device)
    load_optimizer_state(optimizer, tensors, meta["param_groups"])
    return meta


def sample_stream(shards: list[str], rank: int, world: int, seed: int, skip: int = 0) -> Iterator[dict]:
    """Endless decoded samples for one process, a function of (seed, epoch, rank) only; ``skip`` consumed first.

    With at least as many shards as processes each process reads its own shards (every world-th of a seeded
    permutation per epoch); otherwise every process reads all and keeps every world-th sample. Within a shard
    the samples are shuffled (seeded). Resume is exact when the number of processes is unchanged.
    """
    if not shards:
        raise ValueError("face0_train: no shards given")
    by_shard = len(shards) >= world
    epoch = 0
    while True:
        order = sorted(shards)
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        mine = order[rank::world] if by_shard else order
        count = 0
        for path in mine:
            if by_shard and skip >= len(keys := shard_keys(path)):
                skip -= len(keys)
                continue
            groups = list(iter_shard(path))
            random.Random(f"{seed}/{epoch}/{path}").shuffle(groups)
            for _, g in groups:
                count += 1
                if not by_shard and (count - 1) % world != rank:
                    continue
                if skip > 0:
                    skip -= 1
                    continue
                yield decode_sample(g)
        epoch += 1


def collate(samples: list[dict]) -> dict:
    embeds = torch.stack([s["embedding"].float() for s in samples])  # (B, D)
    key = "latent" if all("latent" in s for s in samples) else "image"
    return {"captions": [s["caption"] for s in samples], "embeds": embeds, key: torch.stack([s[key] for s in samples]),
            "embedder": samples[0]["embedder"], "original_sizes": [s.get("original_size") for s in samples],
            "crops_top_left": [s.get("crop_top_left") for s in samples]}
