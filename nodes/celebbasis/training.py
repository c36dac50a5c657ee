"""Training inside ComfyUI, shared by TrainCelebBasis and TrainFaceTI (and their CLIs).

ComfyUI runs nodes under ``torch.inference_mode()`` and its CLIP layers add residuals in place, so a trainer
needs: a clone whose weights are read through a grad-safe wrapper (``grad_safe``, ``trainable_clip``), tensors
copied out of inference mode (``normal_tensor``), the model as a ``denoise(x, sigma, context)`` callable for
``py/train/core.denoising_loss`` (``model_denoiser``), and a differentiable text-encoder forward that takes
the learned vectors at a pseudo-word's positions (``template_tokens`` + ``encode_with``). ``word_model`` bundles
them as the plain callables ``py/celebbasis/train.py`` trains with.
"""

from __future__ import annotations

import comfy.model_management
import comfy.model_sampling
import torch

from ...py.celebbasis.train import WordModel
from .pseudo_words import add_pseudo_word, text_encoder


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
        raise ValueError(f"{node}: training needs an eps- or v-prediction model (SD1.x / SD2.x); this model's "
                         f"sampling is {type(ms).__name__}.")
    model = grad_safe(model)
    comfy.model_management.load_models_gpu([model])
    inner = model.model

    def denoise(x, sigma, context, _keep=model):  # _keep: the wrapped clone stays alive while training
        return inner.apply_model(x, sigma, c_crossattn=context)

    return denoise, ms.sigmas, model.load_device


def template_tokens(clip, templates: list[str], node: str, k: int = 2) -> list[list]:
    """Token lists of each template with a k-vector placeholder embedding where ``{}`` is."""
    marker = "<facecondplaceholder>"
    probe = add_pseudo_word(clip, marker, torch.zeros(k, text_encoder(clip, node).table().shape[1]), node)
    out = []
    for t in templates:
        if t.count("{}") != 1:
            raise ValueError(f"{node}: prompt template {t!r} must contain {{}} exactly once (where the person goes).")
        toks = probe.tokenize(t.replace("{}", marker))
        out.append(toks)
    return out


def encode_with(clip, tokens, vectors: torch.Tensor, node: str = "TrainCelebBasis") -> torch.Tensor:
    """Encode ``tokens`` (from template_tokens with k = len(vectors)) with the placeholder's k entries replaced
    by ``vectors`` (K, d), differentiably w.r.t. ``vectors`` (pass a ``trainable_clip`` in the server).
    ComfyUI builds the input embeddings (``process_tokens``); the transformer
    is then run with out-of-place residuals, because ComfyUI's ``CLIPLayer`` adds them in place (``x += ...``),
    which autograd cannot differentiate. Same weights, same ops: the result equals ComfyUI's encode (tested)."""
    from comfy.ldm.modules.attention import optimized_attention_for_device
    from comfy.model_management import cast_to  # comfy.ops.cast_to is an alias marked for removal

    enc = text_encoder(clip, node)
    sd = enc.module
    if getattr(sd, "enable_attention_masks", False) or getattr(sd, "zero_out_masked", False):
        raise ValueError(f"{node}: this text encoder uses attention masks; training supports SD1.x/SD2.x CLIP.")
    chunks = tokens[next(iter(tokens))]
    if len(chunks) != 1:
        raise ValueError(f"{node}: a prompt template is longer than 75 tokens; shorten it.")
    row, i = [], 0
    for tw in chunks[0]:
        if torch.is_tensor(tw[0]):
            row.append(vectors[i % len(vectors)])
            i += 1
        else:
            row.append(tw[0])
    if i != len(vectors):
        raise ValueError(f"{node}: the prompt has {i} placeholder token(s) for {len(vectors)} vectors")
    clip.cond_stage_model.reset_clip_options()
    if clip.layer_idx is not None:
        clip.cond_stage_model.set_clip_options({"layer": clip.layer_idx})
    clip.load_model()
    device = sd.transformer.get_input_embeddings().weight.device
    embeds, _, _, _ = sd.process_tokens([row], device)
    tm = sd.transformer.text_model
    x = embeds + cast_to(tm.embeddings.position_embedding.weight, dtype=embeds.dtype, device=device)
    mask = torch.full((x.shape[1], x.shape[1]), -torch.finfo(x.dtype).max, dtype=x.dtype, device=device).triu_(1)
    attn = optimized_attention_for_device(device, mask=True, small_input=True)  # as CLIPEncoder
    layers = tm.encoder.layers
    if sd.layer not in ("last", "hidden"):
        raise ValueError(f"{node}: text-encoder output layer {sd.layer!r} is not supported (last/hidden).")
    stop = len(layers) - 1 if sd.layer == "last" else (sd.layer_idx % len(layers))
    for layer in layers[:stop + 1]:
        x = x + layer.self_attn(layer.layer_norm1(x), mask, attn)
        x = x + layer.mlp(layer.layer_norm2(x))
    if sd.layer == "last" or sd.layer_norm_hidden_state:
        x = tm.final_layer_norm(x)
    return x.float()


def encode_images(vae, model, images: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        lat = vae.encode(images[..., :3])
        lat = model.model.process_latent_in(lat)
    return lat.clone()


def native_resolution(model) -> int:
    """The image side a checkpoint was trained at: 768 for SD2.x v-prediction models (SD 2.0/2.1 768-v), else
    512 (SD1.x, SD 2.x-base)."""
    ms = model.get_model_object("model_sampling")
    conf = type(getattr(model.model, "model_config", None)).__name__
    return 768 if isinstance(ms, comfy.model_sampling.V_PREDICTION) and conf.startswith("SD2") else 512


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
            "at: the centred square of each is resized to it. 0 = the model's native size (512 for SD1.x and SD "
            "2.x-base, 768 for SD 2.x-v), as the papers train; smaller is faster."})


def word_model(model, clip, vae, templates: list[str], node: str, k: int = 2) -> WordModel:
    """A ComfyUI MODEL / CLIP / VAE as the trainers' ``WordModel``: the model's denoiser and sigma table, the VAE
    encoder, and ``templates`` (each with one ``{}``) encoded through a trainable clone of the CLIP with k vectors
    at ``{}``. The inputs are not modified."""
    denoise, sigmas, device = model_denoiser(model, node)
    tokens = template_tokens(clip, templates, node, k=k)
    tclip = trainable_clip(clip)
    return WordModel(denoise=denoise, sigmas=sigmas, device=device,
                     encode_images=lambda images: encode_images(vae, model, images),
                     encode_text=lambda t, vectors: encode_with(tclip, tokens[t], vectors, node),
                     templates=len(tokens))
