"""The pack's shared training core: denoising loss, seeded sampling, an optimiser loop, resumable state.

Pure torch (no ComfyUI imports). Used by the Celeb Basis MLP and face textual-inversion trainers
(``py/celebbasis/train.py``), the Face0 trainer (``face0_train``: loss, sampling, optimiser state) and the
IP-Adapter aggregator trainer. API (stable):

``TrainConfig(steps, lr, betas, eps, weight_decay, grad_clip, seed)``
    Adam settings and the run length. ``seed`` fixes every random draw (see ``step_generator``).

``step_generator(seed, step) -> torch.Generator``
    The generator for one optimiser step: a function of (seed, step) only, so a run resumed at step k draws
    exactly what the uninterrupted run drew at step k (no RNG state has to be saved for exact resume).

``sample_sigmas(sigmas, batch, generator) -> (sigma (B,), index (B,))``
    Uniform draw over the model's discrete noise levels (``model_sampling.sigmas`` in ComfyUI, 1000 for SD),
    i.e. the uniform-timestep sampling of the LDM/DDPM training objective (Ho et al. 2020, eq. 14).

``denoising_loss(denoise, x0, context, sigma, noise, prediction="x0") -> scalar``
    The plain (ε-)denoising loss ``E ||ε - ε_θ(x_t, t, c)||²`` (Ho et al. 2020; Rombach et al. 2022 eq. 2) in
    the variance-exploding form ComfyUI uses for EPS and V-prediction models: ``x_t = x0 + σ·ε``.
    ``denoise(x_noisy, sigma, context)`` is the caller's model call. ``prediction="x0"``: it returns the
    denoised latent (what ComfyUI's ``model.apply_model`` returns for every parameterisation); the loss maps
    it to ``ε̂ = (x_t - x̂0)/σ``. ``prediction="eps"``: it returns ε̂ directly. Flow (CONST) models are not
    covered; callers check.

``Trainer(params, config)``
    ``params``: dict name -> leaf tensor (``requires_grad=True``), e.g. ``dict(mlp.named_parameters())``.
    ``run(loss_fn, steps=None, progress=None, check_interrupt=None) -> list[float]``: for each step,
    ``loss_fn(step, generator)`` returns a scalar loss; gradients are taken with ``torch.autograd.grad``
    w.r.t. ``params`` only, so nothing else (a frozen UNet, the text encoder) ever gets a ``.grad``;
    Adam steps; ``progress(step_done, total, loss)`` after each step; ``check_interrupt()`` before each step
    (raise to cancel: the trainer keeps the state of the last finished step, so it can still be saved).
    ``checkpoint()`` every ``checkpoint_every`` steps (the caller's save).
    ``save(path, extra_meta)`` / ``load(path)``: one .safetensors file (written atomically; ``load`` works under
    ``torch.inference_mode()``) holding the parameters
    (``param.<name>``) and Adam's tensors (``optim.<i>.<key>``); its header metadata holds JSON with the
    step, losses, config, param-group settings and the caller's metadata. No pickle anywhere.
    ``optimizer_state`` / ``load_optimizer_state``: the optimiser's part of that file, shared with other trainers.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from safetensors import safe_open

from ..weights import packfile
from ..weights.atomic import save_file

log = logging.getLogger("facecond")

STATE_FORMAT = "facecond.train_state.v1"

DenoiseFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
LossFn = Callable[[int, torch.Generator], torch.Tensor]


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 400
    lr: float = 5e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0  # Adam's L2 term (added to the gradient), not AdamW's decoupled decay
    grad_clip: float = 0.0  # max global grad norm; 0 = off
    seed: int = 0

    def __post_init__(self):
        if self.steps < 0 or self.lr <= 0 or not (0 <= self.betas[0] < 1 and 0 <= self.betas[1] < 1):
            raise ValueError(f"TrainConfig: need steps >= 0, lr > 0, 0 <= betas < 1; got {self}")


def step_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator seeded from (seed, step) alone (splitmix64-style mixing, so nearby seeds differ)."""
    z = (int(seed) * 0x9E3779B97F4A7C15 + int(step) + 1) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return torch.Generator().manual_seed((z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF)


def sample_sigmas(sigmas: torch.Tensor, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma (B,), index (B,)): noise levels drawn uniformly from the model's discrete table ``sigmas``."""
    if sigmas.ndim != 1 or sigmas.numel() == 0:
        raise ValueError(f"sample_sigmas: sigmas must be a non-empty 1-d table, got shape {tuple(sigmas.shape)}")
    idx = torch.randint(0, sigmas.numel(), (batch,), generator=generator)
    return sigmas.detach().float().cpu()[idx], idx


def sample_noise(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Standard normal noise shaped like ``like`` (drawn on the CPU in float32, so it is device-independent)."""
    return torch.randn(like.shape, generator=generator, dtype=torch.float32).to(like.device, like.dtype)


def denoising_loss(denoise: DenoiseFn, x0: torch.Tensor, context: torch.Tensor, sigma: torch.Tensor,
                   noise: torch.Tensor, prediction: str = "x0") -> torch.Tensor:
    """Mean ||ε̂ - ε||² with x_t = x0 + σ·ε; see the module docstring. x0, noise: (B, C, H, W); sigma: (B,)."""
    if prediction not in ("x0", "eps"):
        raise ValueError(f"denoising_loss: prediction must be 'x0' or 'eps', got {prediction!r}")
    if x0.shape != noise.shape or sigma.shape != (x0.shape[0],):
        raise ValueError(f"denoising_loss: x0 {tuple(x0.shape)}, noise {tuple(noise.shape)} and sigma "
                         f"{tuple(sigma.shape)} do not match (need (B, ...), (B, ...), (B,))")
    s = sigma.to(x0.device, x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
    x_t = x0 + s * noise
    pred = denoise(x_t, sigma.to(x0.device), context)
    eps_hat = pred if prediction == "eps" else (x_t - pred.to(x_t.dtype)) / s
    return torch.mean((eps_hat.float() - noise.float()) ** 2)


class Trainer:
    """Adam over a dict of leaf tensors, step by step, resumable bit for bit (see the module docstring)."""

    def __init__(self, params: dict[str, torch.Tensor], config: TrainConfig):
        if not params:
            raise ValueError("Trainer: no parameters to train")
        for name, p in params.items():
            if not (p.is_leaf and p.requires_grad):
                raise ValueError(f"Trainer: parameter {name!r} must be a leaf tensor with requires_grad=True")
        self.params = dict(params)
        self.config = config
        self.step = 0
        self.losses: list[float] = []
        self.optimizer = torch.optim.Adam(list(self.params.values()), lr=config.lr, betas=tuple(config.betas),
                                          eps=config.eps, weight_decay=config.weight_decay)

    def run(self, loss_fn: LossFn, steps: int | None = None, *,
            progress: Callable[[int, int, float], None] | None = None,
            check_interrupt: Callable[[], None] | None = None,
            checkpoint: Callable[[], None] | None = None, checkpoint_every: int = 0) -> list[float]:
        """Run until ``steps`` (default ``config.steps``) steps are done in total; returns this call's losses.
        ``checkpoint()`` is called after every ``checkpoint_every``-th step (not after the last: the caller saves
        the end of the run itself)."""
        total = self.config.steps if steps is None else steps
        names, tensors = list(self.params), list(self.params.values())
        out = []
        with torch.inference_mode(False), torch.enable_grad():
            while self.step < total:
                if check_interrupt is not None:
                    check_interrupt()
                loss = loss_fn(self.step, step_generator(self.config.seed, self.step))
                if loss.ndim != 0 or not torch.isfinite(loss):
                    raise ValueError(f"Trainer: step {self.step}: loss is {loss.detach()} (must be a finite scalar); "
                                     "lower the learning rate or check the inputs")
                grads = torch.autograd.grad(loss, tensors, allow_unused=True)
                for name, p, g in zip(names, tensors, grads):
                    if g is None:
                        raise ValueError(f"Trainer: parameter {name!r} does not affect the loss (no gradient)")
                    p.grad = g.detach()
                if self.config.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(tensors, self.config.grad_clip)
                self.optimizer.step()
                for p in tensors:
                    p.grad = None
                self.step += 1
                value = float(loss.detach())
                self.losses.append(value)
                out.append(value)
                if progress is not None:
                    progress(self.step, total, value)
                if checkpoint is not None and checkpoint_every > 0 and self.step % checkpoint_every == 0 \
                        and self.step < total:
                    checkpoint()
        return out

    # --- save / resume -------------------------------------------------------------------------------------
    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {f"param.{n}": p.detach().cpu().contiguous().clone() for n, p in self.params.items()}
        optim, groups = optimizer_state(self.optimizer)
        meta = {"format": STATE_FORMAT, "step": self.step, "losses": self.losses, "config": asdict(self.config),
                "param_names": list(self.params), "param_groups": groups}
        return tensors | optim, meta

    def state_file(self, extra_meta: dict | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """(tensors, safetensors metadata) of the state file ``save`` writes (for writers of file pairs)."""
        tensors, meta = self.state_tensors()
        meta["extra"] = extra_meta or {}
        return tensors, {"facecond_train_state": json.dumps(meta)}

    def save(self, path: str, extra_meta: dict | None = None) -> None:
        tensors, metadata = self.state_file(extra_meta)
        save_file(tensors, str(path), metadata=metadata)

    def load(self, path: str) -> dict:
        """Restore parameters, Adam state, step and losses from ``save``; returns the saved ``extra_meta``.
        Safe under ``torch.inference_mode()`` (the ComfyUI server runs nodes in it): the tensors are read and
        copied as normal tensors, so Adam can update its state in place afterwards."""
        with torch.inference_mode(False):
            meta, tensors = read_state(path)
            tensors = {k: v.clone() for k, v in tensors.items()}
            if meta["param_names"] != list(self.params):
                raise ValueError(f"{path}: trainer state is for parameters {meta['param_names']}, "
                                 f"not {list(self.params)}")
            for n, p in self.params.items():
                t = tensors[f"param.{n}"]
                if t.shape != p.shape:
                    raise ValueError(f"{path}: parameter {n!r} has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
                with torch.no_grad():
                    p.copy_(t.to(p.device, p.dtype))
            load_optimizer_state(self.optimizer, tensors, meta["param_groups"])
        self.step = int(meta["step"])
        self.losses = [float(x) for x in meta["losses"]]
        return meta.get("extra", {})


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """(tensors ``optim.<i>.<key>`` on the CPU, JSON-ready param groups) of a torch optimiser: what a state file
    stores of it (every trainer of the pack: ``Trainer`` here, ``face0_train``)."""
    sd = optimizer.state_dict()
    tensors = {}
    for i, st in sd["state"].items():
        for key, val in st.items():
            t = val if torch.is_tensor(val) else torch.tensor(val)
            tensors[f"optim.{i}.{key}"] = t.detach().cpu().contiguous().clone()
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, groups


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                         groups: list[dict]) -> None:
    """Restore what ``optimizer_state`` returned (other keys of ``tensors`` are ignored)."""
    state: dict[int, dict] = {}
    for key, t in tensors.items():
        if key.startswith("optim."):
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = t
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in groups]
    with torch.inference_mode(False):  # tensors read under inference mode would refuse Adam's in-place updates
        state = {i: {k: t.clone() for k, t in st.items()} for i, st in state.items()}
        optimizer.load_state_dict({"state": state, "param_groups": groups})


def read_state(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata JSON, tensors) of a trainer state file; ValueError if it is not one."""
    packfile.check_safetensors(path, "trainer state", "the trainer (run it again without resume)")
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("facecond_train_state")
        if raw is None:
            raise ValueError(f"{path} is not a facecond trainer state (no 'facecond_train_state' metadata)")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta = json.loads(raw)
    if meta.get("format") != STATE_FORMAT:
        raise ValueError(f"{path}: trainer state format {meta.get('format')!r}, expected {STATE_FORMAT!r}")
    return meta, tensors

