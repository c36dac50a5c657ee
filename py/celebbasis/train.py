"""Training a pseudo-word against a frozen diffusion model: the Celeb Basis coefficient MLP (Yuan et al. 2023,
"Inserting Anybody in Diffusion Models via Celeb Basis", arXiv:2306.00926, §3.2) and face textual inversion
(Livshits 2023, "Textual inversion modified for faces"; after Gal et al. 2022, "An Image is Worth One Word",
arXiv:2208.01618).

Both learn vectors that stand in a prompt where ``{}`` is, with the plain denoising loss (``core.denoising_loss``)
and everything else frozen; they differ only in what produces the vectors (an MLP over face embeddings in the
celebrity-name basis, or free/log-norm vectors). One step (``word_loss``) draws, from the step's generator and
in this order: the image i, the template t, (augmentation), σ, ε.

Pure torch: the host (ComfyUI, see ``nodes/celebbasis/training.py``) comes in as a ``WordModel`` of plain callables.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..train.augment import augment as augment_images
from ..train.core import DenoiseFn, TrainConfig, Trainer, denoising_loss, sample_noise, sample_sigmas
from .basis import CelebBasis
from .coeffs import CoeffMLP, new_mlp
from .inversion import L2_WEIGHT, REPARAM, TIVectors

log = logging.getLogger("facecond")

Progress = Callable[[int, int, float], None]  # on_step(steps done, total, loss)


@dataclass(frozen=True)
class WordModel:
    """What a pseudo-word trainer needs from the host, as plain callables and tensors."""

    denoise: DenoiseFn  # (x_t, sigma, context) -> denoised x0; differentiable w.r.t. context
    sigmas: torch.Tensor  # (T,) the model's discrete noise levels
    device: torch.device
    encode_images: Callable[[torch.Tensor], torch.Tensor]  # (B, H, W, 3) in [0, 1] -> (B, C, h, w) model latents
    # (template index, (K, d) vectors) -> (1, 77, C); SDXL: ((1, 77, 2048), pooled (1, 1280)), passed on to denoise
    encode_text: Callable[[int, torch.Tensor], torch.Tensor | tuple[torch.Tensor, torch.Tensor]]
    templates: int  # how many prompt templates encode_text knows


@dataclass(frozen=True)
class WordTrainConfig:
    steps: int = 400  # both papers: 400 iterations
    lr: float = 5e-3
    seed: int = 0  # fixes the init (MLP) and every draw of every step (core.step_generator)
    augment: bool = True  # colour jitter, random resize and shift (train.augment), before the VAE


MAX_LABEL_CHARS = 100  # one identities label (README "Limits")


def parse_identities(text: str, n: int, node: str) -> list[int]:
    """Per-image person index from labels 'a,a,b' (first label seen = person 0); empty text: one person."""
    if not text.strip():
        return [0] * n
    if len(text) > (MAX_LABEL_CHARS + 2) * max(n, 1):  # before splitting; +2: a comma and a space per label
        raise ValueError(f"{node}: identities is {len(text):,} characters for {n} images; give one short label per "
                         f"image (at most {MAX_LABEL_CHARS} characters each), e.g. 'a,a,b'.")
    labels = [s.strip() for s in text.replace(";", ",").split(",") if s.strip()]
    if len(labels) != n:
        raise ValueError(f"{node}: identities has {len(labels)} labels for {n} images; give one per image, e.g. "
                         "'a,a,b' (or leave it empty: one person).")
    person = {label: i for i, label in enumerate(dict.fromkeys(labels))}  # first label seen = person 0
    return [person[s] for s in labels]


def square_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, H, W, C) images in [0, 1] -> (N, size, size, 3): the centred square of each, resized (bicubic with
    antialiasing, clamped to [0, 1]). Both papers train at the model's own resolution (SD: 512 px, 64 x 64
    latents); a 160 px face crop would give 20 x 20 latents, a size the UNet rarely saw."""
    if images.ndim != 4 or images.shape[-1] < 3:
        raise ValueError(f"training images must be (N, H, W, 3), got {tuple(images.shape)}")
    if size < 8 or size % 8:
        raise ValueError(f"training resolution must be a multiple of 8 (the VAE's factor), at least 8; got {size}")
    x = images[..., :3].movedim(-1, 1).float()
    h, w = x.shape[-2:]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    x = x[..., top:top + s, left:left + s]
    if s != size:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", antialias=True,
                                            align_corners=False).clamp(0.0, 1.0)
    return x.movedim(1, -1).contiguous()


def image_latents(model: WordModel, images: torch.Tensor, augment: bool) -> Callable[[int, torch.Generator],
                                                                                      torch.Tensor]:
    """latent(i, g): image i's (1, C, h, w) latent on the model's device; augmented with g, or encoded once."""
    pixels = images[..., :3].movedim(-1, 1).float()  # (N, 3, H, W)
    fixed = None if augment else model.encode_images(images)

    def latent(i: int, g: torch.Generator) -> torch.Tensor:
        if fixed is None:
            return model.encode_images(augment_images(pixels[i:i + 1], g).movedim(1, -1)).to(model.device)
        return fixed[i:i + 1].to(model.device)

    return latent


def word_loss(model: WordModel, g: torch.Generator, images: int, latent, vectors: Callable[[int], torch.Tensor]):
    """One step's loss: image i and template t drawn uniformly, x0 = latent(i, g), σ and ε drawn, the context
    encoded with ``vectors(i)`` (K, d) at the word's positions; ``core.denoising_loss`` (ε-MSE)."""
    i = int(torch.randint(0, images, (1,), generator=g))
    t = int(torch.randint(0, model.templates, (1,), generator=g))
    x0 = latent(i, g)
    sigma, _ = sample_sigmas(model.sigmas, 1, g)
    noise = sample_noise(x0, g)
    context = model.encode_text(t, vectors(i))  # (1, 77, C), or (context, pooled) for SDXL
    context = tuple(c.to(model.device) for c in context) if isinstance(context, tuple) else context.to(model.device)
    return denoising_loss(model.denoise, x0, context, sigma, noise)


Save = Callable[[Trainer], None]  # save(trainer): write the run's files at the trainer's step


def _run(trainer: Trainer, loss_fn, config: WordTrainConfig, resume_from: str | None, save: Save | None,
         checkpoint_every: int, on_step: Progress | None, check_interrupt: Callable[[], None] | None, what: str):
    if resume_from:
        trainer.load(resume_from)
        log.info("[facecond] %s: resuming %s at step %d of %d", what, os.path.basename(resume_from), trainer.step,
                 config.steps)
    done = False
    try:
        trainer.run(loss_fn, progress=on_step, check_interrupt=check_interrupt,
                    checkpoint=None if save is None else (lambda: save(trainer)), checkpoint_every=checkpoint_every)
        done = True
    finally:  # the end of the run, or the last finished step of an interrupted one (resumable from there)
        if save is not None:
            try:
                save(trainer)
            except Exception:
                if done:
                    raise
                log.exception("[facecond] %s: could not save the interrupted run at step %d", what, trainer.step)


def train_celeb_basis(model: WordModel, basis: CelebBasis, images: torch.Tensor, embeds: torch.Tensor,
                      ids: list[int], config: WordTrainConfig, *, normalized: bool = True,
                      resume_from: str | None = None, save: Callable[[CoeffMLP, Trainer], None] | None = None,
                      checkpoint_every: int = 0, on_step: Progress | None = None,
                      check_interrupt: Callable[[], None] | None = None) -> tuple[CoeffMLP, Trainer]:
    """Train the coefficient MLP (face embedding -> 2 x p coefficients) on ``images`` (N, H, W, 3) with one
    face embedding per image (``embeds`` (N, D)) and person ``ids`` (N,): each person's embeddings are averaged
    (re-normalised when ``normalized``). ``resume_from``: a trainer state to continue (``Trainer.load``).
    ``save(mlp, trainer)`` is called every ``checkpoint_every`` steps, at the end and when the run is
    interrupted (at its last finished step). Returns (MLP on the CPU, eval mode; trainer)."""
    n = images.shape[0]
    if embeds.shape[0] != n or len(ids) != n:
        raise ValueError(f"train_celeb_basis: {n} images, {embeds.shape[0]} embeddings and {len(ids)} ids; "
                         "need one of each per image")
    with torch.inference_mode(False):
        feats = embeds.detach().float().clone()
        people = torch.stack([feats[[j for j in range(n) if ids[j] == k]].mean(0) for k in range(max(ids) + 1)])
        if normalized:
            people = torch.nn.functional.normalize(people, dim=-1)
        mlp = new_mlp(feats.shape[1], basis, config.seed).to(model.device)
    people = people.to(model.device)
    latent = image_latents(model, images, config.augment)

    def loss_fn(step, g):
        return word_loss(model, g, n, latent, lambda i: basis.embeddings(mlp(people[ids[i]:ids[i] + 1])[0]))

    trainer = Trainer(dict(mlp.named_parameters()), TrainConfig(steps=config.steps, lr=config.lr, seed=config.seed))
    _run(trainer, loss_fn, config, resume_from, None if save is None else (lambda tr: save(mlp, tr)),
         checkpoint_every, on_step, check_interrupt, "Celeb Basis")
    return mlp.cpu().eval(), trainer


def train_face_ti(model: WordModel, start: torch.Tensor, images: torch.Tensor, config: WordTrainConfig, *,
                  reparam: str = "log_norm_e", dims: tuple[int, ...] = (), resume_from: str | None = None,
                  save: Callable[[torch.Tensor, Trainer], None] | None = None, checkpoint_every: int = 0,
                  on_step: Progress | None = None,
                  check_interrupt: Callable[[], None] | None = None) -> tuple[torch.Tensor, Trainer]:
    """Train K textual-inversion vectors from ``start`` (K, d) on ``images`` (N, H, W, 3). Livshits 2023: Adam
    β = (0.9, 0.98); with ``reparam`` 'none' an l2 term of 0.01, else v = a^n·d/||d|| (per text encoder's part of
    d when ``dims`` has several, SDXL: (768, 1280)). ``resume_from`` / ``save``
    (called with the (K, d) float32 CPU vectors and the trainer) / ``checkpoint_every``: as for
    ``train_celeb_basis``. Returns ((K, d) float32 CPU vectors, trainer)."""
    if reparam not in REPARAM:
        raise ValueError(f"train_face_ti: reparam must be one of {list(REPARAM)}, got {reparam!r}")
    with torch.inference_mode(False):
        vecs = TIVectors(start.detach().clone().to(model.device), reparam, dims)
    latent = image_latents(model, images, config.augment)

    def loss_fn(step, g):
        return word_loss(model, g, images.shape[0], latent, lambda i: vecs.vectors())

    def final() -> torch.Tensor:
        with torch.inference_mode(False), torch.no_grad():
            return vecs.vectors().detach().cpu().float().clone()

    cfg = TrainConfig(steps=config.steps, lr=config.lr, betas=(0.9, 0.98), seed=config.seed,
                      weight_decay=L2_WEIGHT if REPARAM[reparam] is None else 0.0)
    trainer = Trainer(vecs.params, cfg)
    _run(trainer, loss_fn, config, resume_from, None if save is None else (lambda tr: save(final(), tr)),
         checkpoint_every, on_step, check_interrupt, "face TI")
    return final(), trainer
