"""IP-Adapter with several reference images: load an IP-Adapter, encode references, aggregate them, patch a model.

IP-Adapter: Ye et al. 2023 (arXiv 2308.06721). The maths lives in ``py/ipadapter/adapter.py`` (projections,
the attn2 patch: decoupled attention); these classes check inputs, call it and wrap the results. The aggregation
node (AggregateEmbeds) is in ``aggregate.py``. CLIP vision comes from ComfyUI's own CLIPVisionLoader
(``comfy.clip_vision.load``).

The patch is ComfyUI's ``set_model_attn2_replace`` on a clone, one per UNet cross-attention, keyed
(block, number, transformer index): input blocks, then output blocks, then the middle block, which is the
order of the file's ``ip_adapter.{1,3,5,...}`` weights. Applying the node again (another person, another
region mask) stacks: the new patch holds both terms; a foreign attn2 replace that was there stays the base. A FaceID
file's LoRA goes on the same clone as weight patches (``lora.py``), once per model.

ComfyUI keeps one attn2 replace per key: another pack's patch set *after* this one replaces it (last wins). The clone
carries an ON_PRE_RUN callback (copied to later clones) that logs a warning at sampling when that happened. With an
attn_mask it also carries a ``calc_cond_batch`` wrapper that hands the areas of area conditionings to the patch
(``py/ipadapter/regions.py``), so the mask is cut to the area ComfyUI samples the conditioning on.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os

import comfy.ldm.modules.attention as comfy_attention
import comfy.model_management as mm
import comfy.patcher_extension
import folder_paths
import torch

from ...py.ipadapter import adapter as ipa
from ...py.ipadapter import aggregate as agg
from ...py.ipadapter import lora as ipa_lora
from ...py.ipadapter import regions
from .. import model_cache
from ..common import FACE_EMBEDS, FACES, IPADAPTER, REF_EMBEDS, require_embeds
from ..model_family import family_name, family_of_width
from ..paths import finite_floats, load_file, read_path
from .faceid_plus import encode_face_and_clip
from .lora import apply_lora

log = logging.getLogger("facecond")

CATEGORY = "facecond/ipadapter"
IPADAPTER_FOLDER = "ipadapter"  # models/ipadapter, the folder IP-Adapter users already have


def _register_folder() -> None:
    default = os.path.join(folder_paths.models_dir, IPADAPTER_FOLDER)
    folder_paths.add_model_folder_path(IPADAPTER_FOLDER, default)  # appended if another pack registered it
    paths, exts = folder_paths.folder_names_and_paths[IPADAPTER_FOLDER]
    if exts:  # an empty set means "no filter": keep it
        folder_paths.folder_names_and_paths[IPADAPTER_FOLDER] = (paths, set(exts) | {".safetensors", ".bin"})


_register_folder()

_KV = ipa.KV_ATTR  # the W'_k, W'_v of every layer, registered on the projection module: one module to move


def _adapter_module(adapter: ipa.IPAdapter) -> torch.nn.Module:
    """The module ComfyUI's model management moves and frees: the projection with the K/V weights attached (the
    LoRA stays on the CPU: ComfyUI's weight patching reads it from there)."""
    if not hasattr(adapter.proj, _KV):
        adapter.proj.register_module(_KV, torch.nn.ParameterList(
            [torch.nn.Parameter(t, requires_grad=False) for pair in adapter.kv for t in pair]))
    return adapter.proj


def _with_module_kv(adapter: ipa.IPAdapter) -> ipa.IPAdapter:
    """The adapter reading its K/V weights from the module (wherever the model manager has put them)."""
    kv = getattr(_adapter_module(adapter), _KV)
    return dataclasses.replace(adapter, kv=tuple((kv[2 * i], kv[2 * i + 1]) for i in range(len(kv) // 2)))


def _adapter_on_device(adapter: ipa.IPAdapter) -> ipa.IPAdapter:
    """The adapter with its projection and K/V weights on ComfyUI's device (``model_cache.to_device``)."""
    model_cache.to_device(_adapter_module(adapter))
    return _with_module_kv(adapter)


def model_dtype() -> torch.dtype:
    """The dtype ComfyUI picks for a diffusion model on its device (fp16/bf16 on a GPU, float32 on most CPUs):
    the adapter's weights are kept in it (tokens and K', V' are still computed to float32)."""
    return mm.unet_dtype(device=mm.get_torch_device())


def _load_adapter(ipadapter_name: str, dtype: torch.dtype | None = None) -> ipa.IPAdapter:
    sd = load_file("LoadIPAdapter", "ipadapter_name", IPADAPTER_FOLDER, ipadapter_name, ipa.read_file)
    adapter = load_file("LoadIPAdapter", "ipadapter_name", IPADAPTER_FOLDER, ipadapter_name,
                        lambda _path: ipa.from_state_dict(sd, ipadapter_name, dtype or model_dtype()))
    return _with_module_kv(adapter)  # no second copy of W'_k, W'_v outside the module


def comfy_optimized_attention(q, k, v, heads, **kw):
    """ComfyUI's attention function of the moment (looked up per call: it is chosen at startup)."""
    return comfy_attention.optimized_attention(q, k, v, heads, **kw)


def cross_attention_layers(model) -> list[tuple[tuple, int, int]]:
    """[((block, number, transformer_index), inner_dim, context_dim)] of a UNet's cross-attentions, in the
    IP-Adapter order: input blocks, output blocks, middle block."""
    unet = model.get_model_object("diffusion_model")
    out = []
    groups = [("input", getattr(unet, "input_blocks", [])), ("output", getattr(unet, "output_blocks", [])),
              ("middle", [unet.middle_block] if getattr(unet, "middle_block", None) is not None else [])]
    for name, blocks in groups:
        for i, block in enumerate(blocks):
            for mod in block.modules():
                if isinstance(mod, comfy_attention.SpatialTransformer):
                    for j, tb in enumerate(mod.transformer_blocks):
                        if tb.attn2 is not None:
                            out.append(((name, i, j), tb.attn2.to_k.out_features, tb.attn2.to_k.in_features))
    return out


HOOK_KEY = "facecond_ipadapter"  # key of the pack's wrapper and callback on the patched clone


def _areas_wrapper(executor, model, conds, x_in, timestep, model_options):
    """``calc_cond_batch`` wrapper: the areas of area conditionings (by cond uuid) into transformer_options, where the
    attn2 patch reads them (``regions.AREAS_KEY``). Without area conds, model_options pass through unchanged."""
    areas = regions.cond_areas(conds, tuple(x_in.shape[-2:]))
    if areas:
        to = {**model_options.get("transformer_options", {}), regions.AREAS_KEY: areas}
        model_options = {**model_options, "transformer_options": to}
    return executor(model, conds, x_in, timestep, model_options)


def _holds_ours(patch) -> bool:
    """Ours, or a foreign patch that keeps ours as an attribute (to call it: the patch chains)."""
    return isinstance(patch, ipa.IPAttentionPatch) or \
        any(isinstance(v, ipa.IPAttentionPatch) for v in getattr(patch, "__dict__", {}).values())


def _qualname(obj) -> str:
    """module.name of a function, or of an object's class."""
    named = obj if hasattr(obj, "__qualname__") else type(obj)
    return f"{getattr(named, '__module__', '?')}.{named.__qualname__}"


def check_not_replaced(patcher, keys: tuple) -> list:
    """ON_PRE_RUN callback: warn when another attn2 replace was set over ours at ``keys`` after ApplyIPAdapter
    (ComfyUI keeps the last one per key). Returns the replaced keys. One dict lookup per layer, once per sampling."""
    attn2 = patcher.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    lost = [k for k in keys if not _holds_ours(attn2.get(k))]
    if lost:
        by = sorted({_qualname(attn2[k]) for k in lost if k in attn2})
        log.warning("[facecond] ApplyIPAdapter: the IP-Adapter attn2 patch is gone from %d of %d cross-attentions "
                    "(replaced by %s): a patch set after ApplyIPAdapter replaces it, and the image term is off there. "
                    "Put ApplyIPAdapter after the other node (it keeps a patch that was there before as its base).",
                    len(lost), len(keys), ", ".join(by) or "nothing: removed")
    return lost


class LoadIPAdapter:
    DESCRIPTION = ("Loads an SD1.5 or SDXL IP-Adapter from models/ipadapter (.safetensors, or .bin read as plain "
                   "tensors only), its weights in the dtype ComfyUI uses for the model (fp16/bf16 on a GPU). The "
                   "variant is read from the file's keys and shapes: plain (CLIP image embedding), plus / plus-face "
                   "and full-face (CLIP hidden states), FaceID and FaceID Portrait (face embeddings), FaceID Plus and "
                   "Plus v2 (face embedding + CLIP hidden states of the face crop; v2 by its file name). Other "
                   "layouts (InstantID, PuLID, FLUX, SD3) are refused by name. A FaceID file's LoRA is kept and "
                   "applied by ApplyIPAdapter (lora_strength).")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (IPADAPTER, "STRING")
    RETURN_NAMES = ("ipadapter", "info")
    OUTPUT_TOOLTIPS = ("The IP-Adapter: image projection and the per-layer image keys/values W'_k, W'_v.",
                       "Variant, input it takes, image tokens and layer count.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"ipadapter_name": (folder_paths.get_filename_list(IPADAPTER_FOLDER), {
            "tooltip": "IP-Adapter file in models/ipadapter, e.g. ip-adapter_sd15.safetensors, "
                       "ip-adapter-plus_sd15.safetensors, ip-adapter-faceid_sd15.bin, "
                       "ip-adapter-faceid-plusv2_sdxl.bin or ip-adapter-faceid-portrait_sdxl.bin."})}}

    def load(self, ipadapter_name):
        path = read_path("LoadIPAdapter", "ipadapter_name", IPADAPTER_FOLDER, ipadapter_name)
        adapter = model_cache.load("ipadapter", path, lambda _p: _load_adapter(ipadapter_name), _adapter_module)
        v = adapter.variant
        info = (f"{ipadapter_name}: {v.title} IP-Adapter ({v.name}), takes {v.input_kind} ({v.input_dim}-d"
                f"{f' + {v.clip_dim}-d CLIP hidden states' if v.clip_dim else ''}), {v.tokens} image tokens of width "
                f"{v.cross_dim}, {len(adapter.kv)} cross-attention layers, weights in "
                f"{str(next(adapter.proj.parameters()).dtype).replace('torch.', '')} "
                f"({adapter.resident_bytes() / 2**20:.1f} MiB)")
        if adapter.lora:
            info += (f", LoRA on {len(ipa_lora.processors(adapter.lora))} attention layers (rank "
                     f"{ipa_lora.rank(adapter.lora)}; ApplyIPAdapter's lora_strength)")
        log.info("[facecond] %s", info)
        return (adapter, info)


def _check_adapter(node: str, ipadapter) -> ipa.IPAdapter:
    if not isinstance(ipadapter, ipa.IPAdapter):
        raise ValueError(f"{node}: input 'ipadapter' must come from FacecondLoadIPAdapter "
                         f"(got {type(ipadapter).__name__}).")
    return ipadapter


class IPAdapterEncode:
    DESCRIPTION = ("Turns reference photos into the embeddings an IP-Adapter takes, one row per reference: FaceID "
                   "and FaceID Portrait use face_embeds (FaceEmbed); plain, plus and full-face encode image with "
                   "clip_vision (ComfyUI's CLIPVisionLoader; image embeds for plain, penultimate hidden states for "
                   "plus); FaceID Plus / Plus v2 take face_embeds and faces and encode each face's aligned 224 crop "
                   "of image with clip_vision. Rows that are NaN or zero are skipped and reported, never fatal.")
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = (REF_EMBEDS, "STRING")
    RETURN_NAMES = ("embeds", "report")
    OUTPUT_TOOLTIPS = ("N reference embeddings (for AggregateEmbeds or ApplyIPAdapter).",
                       "References used and skipped.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "ipadapter": (IPADAPTER, {"tooltip": "From LoadIPAdapter: decides which embedding is made."}),
            "crop": (["center", "none"], {"default": "center", "tooltip":
                     "CLIP vision only: center crops the square middle of each photo, none squashes it."}),
        }, "optional": {
            "image": ("IMAGE", {"tooltip": "Reference photos (plain / plus IP-Adapters), one per batch entry."}),
            "clip_vision": ("CLIP_VISION", {"tooltip": "ComfyUI's CLIPVisionLoader output: the image encoder the "
                            "IP-Adapter was trained with (ViT-H for SD1.5 and the SDXL vit-h files, ViT-bigG for the "
                            "SDXL base ones); needed with image."}),
            "face_embeds": (FACE_EMBEDS, {"tooltip": "FaceID IP-Adapters: FaceEmbed output (use FaceDetectCrop "
                            "with no_face=skip so faceless photos are dropped, not fatal)."}),
            "faces": (FACES, {"tooltip": "FaceID Plus / Plus v2 only: the FaceDetectCrop output FaceEmbed read; "
                      "its keypoints cut each face's aligned 224 crop of image for clip_vision (insightface "
                      "norm_crop, as the IP-Adapter authors do)."}),
        }}

    def encode(self, ipadapter, crop, image=None, clip_vision=None, face_embeds=None, faces=None):
        node = "IPAdapterEncode"
        v = _check_adapter(node, ipadapter).variant
        notes = []
        if v.input_kind == "face+clip_hidden":
            embeds = agg.drop_unusable(encode_face_and_clip(node, ipadapter, image, clip_vision, face_embeds, faces,
                                                        notes))
            report = "; ".join([f"{len(embeds)} references ({v.input_kind}, {embeds.model})", *embeds.notes])
            log.info("[facecond] %s: %s", node, report)
            return (embeds, report)
        if v.input_kind == "face":
            if face_embeds is None:
                raise ValueError(f"{node}: {ipadapter.name} is a FaceID IP-Adapter: connect face_embeds "
                                 "(FaceDetectCrop -> FaceEmbed).")
            x = require_embeds(node, "face_embeds", face_embeds, dim=v.input_dim, against=f"{ipadapter.name} takes",
                               fix="FaceID: insightface buffalo_l, 512-d", allow_empty=True, finite=False)
            model, src = face_embeds.model, tuple(face_embeds.source_index)
            missing = sorted(set(range(max(src, default=-1) + 1)) - set(src))
            if missing:
                notes.append(f"images {missing} had no usable face (skipped by FaceDetectCrop)")
        else:
            if image is None or clip_vision is None:
                raise ValueError(f"{node}: {ipadapter.name} is a {v.title} IP-Adapter: connect image and "
                                 "clip_vision (CLIPVisionLoader with the CLIP-ViT-H-14 image encoder).")
            out = clip_vision.encode_image(image, crop=crop == "center")
            x = (out["image_embeds"] if v.input_kind == "clip_embeds" else out["penultimate_hidden_states"]).float()
            model, src = f"clip_vision/{v.input_kind}", tuple(range(x.shape[0]))
        if x.shape[-1] != v.input_dim:
            raise ValueError(f"{node}: the embeddings are {x.shape[-1]}-d ({model}) but {ipadapter.name} takes "
                             f"{v.input_dim}-d {v.input_kind}. Use the encoder it was trained with (FaceID: "
                             "insightface buffalo_l 512-d; plain/plus: CLIP-ViT-H-14, or ViT-bigG-14 for SDXL base "
                             "files).")
        embeds = agg.RefEmbeds(x.cpu(), v.input_kind, model, src, tuple(notes))
        embeds = agg.drop_unusable(embeds)
        report = "; ".join([f"{len(embeds)} references ({v.input_kind}, {model})", *embeds.notes])
        log.info("[facecond] %s: %s", node, report)
        return (embeds, report)


class ApplyIPAdapter:
    DESCRIPTION = ("Adds the image prompt to every cross-attention of a clone of the model: Z = Attention(Q,K,V) + "
                   "weight·Attention(Q,K',V') (IP-Adapter, Ye et al. 2023), between start_at and end_at, inside "
                   "attn_mask (cut to each area of an area conditioning). Apply it again for a second person in "
                   "another region (the terms stack). Another pack's attn2 patch set before it stays its base; one "
                   "set after it replaces it (a warning at sampling says so). Several reference rows are used side "
                   "by side; AggregateEmbeds makes them one. A FaceID file's LoRA goes on the clone's attention "
                   "weights with lora_strength.")
    CATEGORY = CATEGORY
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The patched clone (the input model is unchanged).",)

    @classmethod
    def VALIDATE_INPUTS(cls, weight=None, start_at=None, end_at=None, lora_strength=None, s_scale=None):
        return finite_floats(cls, "ApplyIPAdapter", weight=weight, start_at=start_at, end_at=end_at,
                             lora_strength=lora_strength, s_scale=s_scale)  # NaN/inf, min/max

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "A model of the family the IP-Adapter was made for (SD1.5 or SDXL; "
                      "existing patches are kept)."}),
            "ipadapter": (IPADAPTER, {"tooltip": "From LoadIPAdapter."}),
            "embeds": (REF_EMBEDS, {"tooltip": "From IPAdapterEncode or AggregateEmbeds."}),
            "weight": ("FLOAT", {"default": 1.0, "min": -1.0, "max": 5.0, "step": 0.05, "tooltip":
                       "λ: strength of the image term (0: no image term, 1: as trained). A FaceID file's LoRA "
                       "has its own lora_strength."}),
            "start_at": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                         "Start of the sigma range where the image term is active, as ComfyUI's start_percent "
                         "(ControlNetApplyAdvanced): 0 = the model's highest sigma. A sigma percent, not a share of "
                         "the steps: how many steps it covers depends on the scheduler."}),
            "end_at": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                       "End of the sigma range where the image term is active, as ComfyUI's end_percent: 1 = sigma "
                       "0 (to the last step). On 20 steps, 0.5 covers 10 steps with normal, 7 with exponential, 11 "
                       "with beta. Outside the range the patch costs nothing."}),
        }, "optional": {
            "attn_mask": ("MASK", {"tooltip": "Where the image term applies (1) and not (0), over the whole image "
                          "(image-sized is exact; another aspect is stretched, with a warning). One mask, or one per "
                          "latent batch image. With area conditionings (ConditioningSetArea) it is cut to each area. "
                          "For two people in two regions, apply the node twice with complementary masks."}),
            "lora_strength": ("FLOAT", {"default": 1.0, "min": -1.0, "max": 2.0, "step": 0.05, "tooltip":
                              "FaceID files only: strength of the LoRA the file holds for the U-Net's attention "
                              "(1: as trained, 0: off), on every step (start_at/end_at time the image term only). "
                              "Put on the whole model once, even when the node is applied again for another "
                              "region; files without LoRA ignore it."}),
            "s_scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 5.0, "step": 0.05, "tooltip":
                        "FaceID Plus v2 only: weight of the CLIP face-crop part against the face-embedding shortcut, "
                        "tokens = x + s_scale·resampler(x, CLIP) (the authors' s_scale; 1 as trained, 0: the "
                        "face embedding alone). Other variants ignore it."}),
        }}

    def apply(self, model, ipadapter, embeds, weight, start_at, end_at, attn_mask=None, lora_strength=1.0,
              s_scale=1.0):
        node = "ApplyIPAdapter"
        adapter = _check_adapter(node, ipadapter)
        v = adapter.variant
        if not isinstance(embeds, agg.RefEmbeds):
            raise ValueError(f"{node}: input 'embeds' must come from IPAdapterEncode / AggregateEmbeds.")
        if start_at > end_at:
            raise ValueError(f"{node}: start_at ({start_at}) is after end_at ({end_at}); swap them.")
        if len(embeds) == 0:
            log.warning("[facecond] %s: no usable reference (%s); the model is returned unpatched.", node,
                        "; ".join(embeds.notes))
            return (model.clone(),)
        if embeds.kind != v.input_kind or embeds.embeds.shape[-1] != v.input_dim:
            raise ValueError(f"{node}: embeds are {embeds.kind} ({embeds.embeds.shape[-1]}-d) but {adapter.name} takes "
                             f"{v.input_kind} ({v.input_dim}-d). Encode them with this IP-Adapter in IPAdapterEncode.")
        layers = cross_attention_layers(model)
        dims = [(k.shape[0], k.shape[1]) for k, _ in adapter.kv]
        if [(inner, ctx) for _, inner, ctx in layers] != dims:
            made_for = family_of_width(dims[0][1]) if dims else "no"
            this = family_name(model)
            model_ctx = layers[0][2] if layers else "no"
            raise ValueError(f"{node}: {adapter.name} ({v.title}) was made for {made_for} models ({len(dims)} "
                             f"cross-attention layers, context width {dims[0][1] if dims else '-'}) but this model "
                             f"is {this} ({len(layers)} cross-attentions, context width {model_ctx}). An IP-Adapter "
                             "only works "
                             f"on the family it was trained for: load a {this} IP-Adapter, or use a {made_for} "
                             "checkpoint.")
        mask = None
        if attn_mask is not None:
            mask = (attn_mask if attn_mask.ndim == 3 else attn_mask[None]).float().clamp(0, 1).cpu()
        adapter = _adapter_on_device(adapter)
        if v.input_kind == "face+clip_hidden" and (embeds.clip is None or embeds.clip_neg is None):
            raise ValueError(f"{node}: embeds carry no CLIP hidden states of the face crops; {adapter.name} is "
                             f"{v.title}: encode them with it in IPAdapterEncode (face_embeds, faces, image, "
                             "clip_vision).")
        tokens = adapter.image_tokens(embeds.embeds, embeds.clip, s_scale)
        negative = adapter.negative_tokens(embeds.embeds, embeds.clip_neg, s_scale)
        ms = model.get_model_object("model_sampling")
        s_start, s_end = ms.percent_to_sigma(start_at), ms.percent_to_sigma(end_at)
        terms = ipa.layer_terms(adapter, tokens, negative, weight, s_start, s_end, mask)
        m = model.clone()
        apply_lora(node, m, adapter, lora_strength)
        existing = m.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
        for (key, _, _), term in zip(layers, terms):
            old = existing.get(key)
            patch = old.with_term(term) if isinstance(old, ipa.IPAttentionPatch) else \
                ipa.IPAttentionPatch((term,), previous=old, attention=comfy_optimized_attention)
            m.set_model_attn2_replace(patch, *key)
        keys = tuple(key for key, _, _ in layers)
        if not m.get_callbacks(comfy.patcher_extension.CallbacksMP.ON_PRE_RUN, HOOK_KEY):  # copied by clone: once
            m.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_PRE_RUN, HOOK_KEY,
                                    functools.partial(check_not_replaced, keys=keys))
        if mask is not None and not m.get_wrappers(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, HOOK_KEY):
            m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, HOOK_KEY, _areas_wrapper)
        return (m,)


NODE_CLASS_MAPPINGS = {
    "FacecondLoadIPAdapter": LoadIPAdapter,
    "FacecondIPAdapterEncode": IPAdapterEncode,
    "FacecondApplyIPAdapter": ApplyIPAdapter,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FacecondLoadIPAdapter": "LoadIPAdapter",
    "FacecondIPAdapterEncode": "IPAdapterEncode",
    "FacecondApplyIPAdapter": "ApplyIPAdapter",
}
