"""Training inside ComfyUI, shared by TrainCelebBasis and TrainFaceTI (and their CLIs).

ComfyUI runs nodes under ``torch.inference_mode()`` and its CLIP layers add residuals in place, so a trainer
needs: a clone whose weights are read through a grad-safe wrapper (``grad_safe``, ``trainable_clip``), tensors
copied out of inference mode (``normal_tensor``), the model as a ``denoise(x, sigma, context)`` callable for
``py/train/core.denoising_loss`` (``model_denoiser``), and a differentiable text-encoder forward that takes
the learned vectors at a pseudo-word's positions (``template_tokens`` + ``encode_with``, in ``text_forward.py``).
``word_model`` bundles them as the plain callables ``py/celebbasis/train.py`` trains with. ``RunFiles`` names a
run's two files (what it trains + its trainer state), writes them as one pair at every checkpoint and finds the
pair to resume.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import comfy.model_management
import comfy.model_sampling
import torch

from ...py.celebbasis.train import WordModel
from ...py.train import denoiser
from ...py.train.core import STATE_FORMAT, Trainer
from ...py.weights import atomic
from ..common import seed_input, steps_input
from ..model_family import NATIVE_TOOLTIP, native_resolution
from .files import names_inputs
from .text_forward import encode_with, template_tokens

log = logging.getLogger("facecond")

DEFAULT_CHECKPOINT_EVERY = 50  # a pair of small files (MLP or TI vectors + Adam state) every 50 steps: < 1 s
DEFAULT_TEMPLATES = "a photo of {}\na depiction of {}\na close-up photo of {}\na portrait of {}\n{} smiling"


def checkpoint_input() -> tuple:
    return ("INT", {"default": DEFAULT_CHECKPOINT_EVERY, "min": 0, "max": 100000, "tooltip": "Save the run (the "
            "result so far and the trainer state) every this many steps, so a crash or a killed server loses at "
            "most this many steps: run again with resume=true to continue. 0 = only at the end and when "
            "cancelled. A cancelled run is always saved at its last finished step."})


def overwrite_input(what: str) -> tuple:
    return ("BOOLEAN", {"default": False, "tooltip": f"false: if {what} already exists, a new numbered name is "
            "used (name_00001, name_00002 ... as SaveImage does) and the old files are kept; the output says "
            "which name was written. true: replace them. resume=true always continues (and rewrites) "
            "save_name's own run."})


@dataclass
class RunFiles:
    """One training run's two files, the result (MLP / embedding) and its trainer state, always written together
    as one stamped pair (``py/weights/atomic.commit_pair``): a kill at any moment leaves the previous pair or the
    new one. ``resume_from``: the state to continue, or None for a new run."""

    node: str
    name: str
    result: str
    state: str
    run: str
    resume_from: str | None
    saved_step: int | None = None

    def save(self, result_file: tuple[dict, dict], trainer: Trainer, state_meta: dict) -> None:
        tensors, meta = result_file
        st, sm = trainer.state_file(state_meta)
        for p in (self.result, self.state):
            os.makedirs(os.path.dirname(p), exist_ok=True)
        atomic.commit_pair([(self.result, tensors, meta), (self.state, st, sm)], atomic.make_stamp(self.run,
                                                                                                   trainer.step))
        self.saved_step = trainer.step

    def interrupted(self) -> None:
        if self.saved_step is None:
            log.warning("[facecond] %s: cancelled before the first step; nothing was saved.", self.node)
            return
        log.warning("[facecond] %s: cancelled; the run is saved at step %d as %s (+ its trainer state %s). To "
                    "continue it, queue the same graph with resume=true and save_name=%r (same seed and "
                    "settings).", self.node, self.saved_step, self.result, self.state, self.name)


def run_files(node: str, save_name: str, paths_of: Callable[[str], tuple[str, str]], *, resume: bool,
              overwrite: bool) -> RunFiles:
    """The files of a run named ``save_name`` (``paths_of(name)`` -> (result, state), checked paths).
    resume: continue save_name's pair (finishing an interrupted write first; a mismatched pair is refused).
    Otherwise a new run: save_name, or the first free numbered name unless ``overwrite``."""
    result, state = paths_of(save_name)
    if resume:
        status = atomic.recover_pair([result, state])
        stamps = [atomic.pair_stamp(p) for p in (result, state)]
        if status == "ok":
            _check_state(node, save_name, state)
            return RunFiles(node, save_name, result, state, json.loads(stamps[1])["run"], state)
        if status == "mismatch":
            if not os.path.isfile(state):
                raise ValueError(f"{node}: resume=true but save_name {save_name!r} has no trainer state ({state} is "
                                 "missing), so its run cannot be continued. Set resume=false to train anew (a new "
                                 "numbered name is used unless overwrite=true).")
            if stamps == [None, None]:  # written before runs were saved as stamped pairs
                log.warning("[facecond] %s: resuming %s, saved before checkpoints were stamped pairs", node, state)
                return RunFiles(node, save_name, result, state, uuid.uuid4().hex, state)

            def step(st):
                return "none" if st is None else f"step {json.loads(st)['step']} of run {json.loads(st)['run'][:8]}"
            raise ValueError(f"{node}: resume=true but save_name {save_name!r}: {os.path.basename(result)} "
                             f"({step(stamps[0])}) and "
                             f"{os.path.basename(state)} ({step(stamps[1])}) are not one pair (a file was replaced, "
                             "copied or deleted by hand); resuming could mix two runs, so it is refused. Set "
                             "resume=false to train anew under a new numbered name, or delete both files.")
        if status == "absent":
            log.warning("[facecond] %s: resume=true but nothing is saved under save_name %r: training a new run",
                        node, save_name)
    name = atomic.free_name(save_name, paths_of, overwrite)
    if name != save_name:
        log.info("[facecond] %s: %r exists; writing %r (overwrite=false)", node, save_name, name)
    result, state = paths_of(name)
    return RunFiles(node, name, result, state, uuid.uuid4().hex, None)


def _check_state(node: str, save_name: str, state: str) -> None:
    """Refuse, before anything is built, a state file that is not a facecond trainer state (from its header)."""
    meta = atomic.header_metadata(state) or {}
    try:
        fmt = json.loads(meta.get("facecond_train_state", "null") or "null")
    except ValueError:
        fmt = None
    if not isinstance(fmt, dict) or fmt.get("format") != STATE_FORMAT:
        raise ValueError(f"{node}: resume=true but save_name {save_name!r}: {os.path.basename(state)} is not a "
                         f"facecond trainer state (expected {STATE_FORMAT!r} metadata), so its run cannot be "
                         "continued. Set resume=false to train anew under a new numbered name, or delete both files.")


def _grad_safe_weight(weight: torch.Tensor) -> torch.Tensor:
    # ComfyUI's ops copy a weight that has a wrapper (cast_bias_weight, copy=True); the copy is made in the
    # trainer's normal mode. This makes sure of it for a weight still created under inference mode.
    return weight.clone() if weight.is_inference() else weight


def grad_safe(patcher):
    """A clone of a ModelPatcher whose weights autograd can differentiate *through* (never *to*).

    The ComfyUI server runs every node under ``torch.inference_mode()``, so the weights of a model it loaded are
    inference tensors, which autograd refuses to save for backward ("Inference tensors cannot be saved for
    backward"). A weight wrapper on every op (ComfyUI's own mechanism, as its LoRA trainer uses) makes each
    forward use a normal-tensor copy; the user's model and its weights are untouched."""
    out = patcher.clone()
    for name, m in out.model.named_modules():
        for attr in ("weight", "bias"):  # layer_norm saves its bias for backward too
            if hasattr(m, f"{attr}_function") and getattr(m, attr, None) is not None:
                out.add_weight_wrapper(f"{name}.{attr}", _grad_safe_weight)
    return out


def trainable_clip(clip):
    """A clone of ``clip`` for ``encode_with`` under the server's inference mode (see ``grad_safe``)."""
    out = clip.clone()
    out.patcher = grad_safe(out.patcher)
    return out


def normal_tensor(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` that is not an inference tensor (so autograd may save it for backward)."""
    with torch.inference_mode(False):
        return t.detach().clone()


def model_denoiser(model, node: str):
    """(denoise(x, sigma, context) -> x0, sigma table) for a ComfyUI MODEL; EPS / V-prediction only.
    Differentiable w.r.t. x and context also when the server loaded the model (``grad_safe``)."""
    ms = model.get_model_object("model_sampling")
    if not isinstance(ms, comfy.model_sampling.EPS) or isinstance(ms, comfy.model_sampling.CONST):
        raise ValueError(f"{node}: training needs an eps- or v-prediction model (SD1.x, SD2.x, SDXL); this model's "
                         f"sampling is {type(ms).__name__}.")
    model = grad_safe(model)
    comfy.model_management.load_models_gpu([model])
    inner = model.model

    def denoise(x, sigma, context, y=None, _keep=model):  # _keep: the wrapped clone stays alive while training
        return denoiser.denoise(inner, x, sigma, context, y=y)  # y: SDXL's ADM vector (denoiser.adm_vector)

    return denoise, ms.sigmas, model.load_device


def encode_images(vae, model, images: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        lat = vae.encode(images[..., :3])
        lat = model.model.process_latent_in(lat)
    return lat.clone()


def training_images(model, images: torch.Tensor, resolution: int, node: str) -> tuple[torch.Tensor, int]:
    """(images as resolution x resolution squares, the side used): resolution 0 = the model's native size."""
    from ...py.celebbasis.train import square_images

    size = native_resolution(model) if not resolution else int(resolution)
    if size < 64 or size % 8:
        raise ValueError(f"{node}: resolution {size} must be 0 (the model's native size) or a multiple of 8 of at "
                         "least 64.")
    with torch.inference_mode(False):
        return square_images(images, size), size


def resolution_input() -> tuple:
    return ("INT", {"default": 0, "min": 0, "max": 4096, "step": 8, "tooltip": "Side (px) the photos are trained "
            "at: the centred square of each is resized to it. " + NATIVE_TOOLTIP + " As the papers train; smaller "
            "is faster."})


def trainer_inputs(*, clip: str, images: str, word: str, steps: str, seed: str) -> dict[str, tuple]:
    """The widgets and sockets TrainCelebBasis and TrainFaceTI share, declared once (name -> spec); each node picks
    them (``pick``) into its own order among its own inputs. The arguments are the tooltips that differ: ``clip``,
    ``images``, ``steps``, ``seed``, and ``word``, what the prompt templates call the person's word. Saved
    workflows store widget values by position: a node's order must never change (tests/nodes/node_schemas.json)."""
    return {
        "model": ("MODEL", {"tooltip": "The diffusion model to train against (frozen)."}),
        "clip": ("CLIP", {"tooltip": clip}),
        "vae": ("VAE", {"tooltip": "Encodes the photos to latents."}),
        "images": ("IMAGE", {"tooltip": images}),
        "prompt_templates": ("STRING", {"default": DEFAULT_TEMPLATES, "multiline": True, "tooltip":
                             f"One prompt per line; {{}} is where the person's {word} goes."}),
        "steps": steps_input(steps, default=400, most=100000),
        "learning_rate": ("FLOAT", {"default": 0.005, "min": 1e-6, "max": 1.0, "step": 1e-4, "round": 1e-6,
                          "tooltip": "Adam learning rate."}),
        "seed": seed_input(seed, control_after_generate=False),
        "augment": ("BOOLEAN", {"default": True, "tooltip": "Colour jitter, random resize and shift."}),
        "resume": ("BOOLEAN", {"default": False, "tooltip": "Continue save_name's run from its last saved step "
                   "(checkpoint, cancel or end; a larger steps trains on). No saved run: starts a new one."}),
        "resolution": resolution_input(),
        **names_inputs(),
        "checkpoint_every": checkpoint_input(),
    }


def pick(spec: dict[str, tuple], *names: str) -> dict[str, tuple]:
    """``spec``'s entries ``names``, in that order."""
    return {n: spec[n] for n in names}


def word_model(model, clip, vae, templates: list[str], node: str, k: int = 2) -> WordModel:
    """A ComfyUI MODEL / CLIP / VAE as the trainers' ``WordModel``: the model's denoiser and sigma table, the VAE
    encoder, and ``templates`` (each with one ``{}``) encoded through a trainable clone of the CLIP with k vectors
    at ``{}``. The inputs are not modified."""
    denoise, sigmas, device = model_denoiser(model, node)
    tokens = template_tokens(clip, templates, node, k=k)
    tclip = trainable_clip(clip)
    base = model.model

    def word_denoise(x, sigma, context):
        if not isinstance(context, tuple):
            return denoise(x, sigma, context)
        # SDXL: the text forward gave (context, pooled); y as ComfyUI builds it when it samples (width and height
        # default to the latent's size in pixels, no crop)
        context, pooled = context
        return denoise(x, sigma, context, y=denoiser.adm_vector(base, pooled, x.shape[-1] * 8, x.shape[-2] * 8))

    return WordModel(denoise=word_denoise, sigmas=sigmas, device=device,
                     encode_images=lambda images: encode_images(vae, model, images),
                     encode_text=lambda t, vectors: encode_with(tclip, tokens[t], vectors, node),
                     templates=len(tokens))
