"""The ComfyUI internals the pack relies on beyond the public node API, each asserted as the pack uses it.

Run on every host (``make test`` runs the suite on ComfyUI 0.3.75 and 0.28): a failure here names the API that
drifted before a node test fails somewhere downstream. The README lists these APIs ("ComfyUI APIs the pack
relies on"); keep the two in sync. Everything runs on real ComfyUI objects (the tiny checkpoint).
"""

from __future__ import annotations

import inspect

import pytest
import torch


def _params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


# --- guider internals (nodes/face0/guidance.py: Guider_Face0ThreeWay) -------------------------------------------------
def test_cfg_guider_internals(tiny_model):
    import comfy.samplers

    model = tiny_model[0]
    guider = comfy.samplers.CFGGuider(model)
    assert guider.model_patcher is model and guider.cfg == 1.0
    assert _params(comfy.samplers.CFGGuider.predict_noise)[:5] == ["self", "x", "timestep", "model_options", "seed"]
    assert _params(comfy.samplers.CFGGuider.sample)[:6] == ["self", "noise", "latent_image", "sampler", "sigmas",
                                                           "denoise_mask"]
    assert {"callback", "disable_pbar", "seed"} <= set(_params(comfy.samplers.CFGGuider.sample))
    seen = []

    class Probe(comfy.samplers.CFGGuider):  # as Guider_Face0ThreeWay: extra conds by name, read in predict_noise
        def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006
            seen.append((sorted(self.conds), self.inner_model is not None))
            return super().predict_noise(x, timestep, model_options, seed)

    probe = Probe(model)
    probe.set_cfg(2.0)
    cond = [[torch.zeros(1, 77, 768), {}]]
    probe.inner_set_conds({"positive": cond, "negative": cond, "text_only": cond})
    latent = torch.zeros(1, 4, 8, 8)
    out = probe.sample(torch.randn(1, 4, 8, 8), latent, comfy.samplers.sampler_object("euler"),
                       torch.tensor([1.0, 0.0]), disable_pbar=True, seed=0)
    assert out.shape == latent.shape and seen == [(["negative", "positive", "text_only"], True)]
    assert _params(comfy.samplers.calc_cond_batch)[:5] == ["model", "conds", "x_in", "timestep", "model_options"]
    cfg_params = _params(comfy.samplers.cfg_function)
    assert cfg_params[:6] == ["model", "cond_pred", "uncond_pred", "cond_scale", "x", "timestep"]
    assert {"model_options", "cond", "uncond"} <= set(cfg_params)


def test_cfg_function_is_plain_cfg_without_patches():
    import comfy.samplers

    c, u, x = torch.full((1, 4, 2, 2), 3.0), torch.full((1, 4, 2, 2), 1.0), torch.zeros(1, 4, 2, 2)
    out = comfy.samplers.cfg_function(None, c, u, 7.5, x, torch.ones(1), model_options={}, cond=None, uncond=None)
    assert torch.equal(out, torch.full((1, 4, 2, 2), 1.0 + 7.5 * 2.0))  # u + w·(c − u)


def test_sampler_hook_keys(tiny_model):
    """The model_options keys the guider reads: pre-CFG hooks, the cond-batch override, the cfg1 switch."""
    m = tiny_model[0].clone()
    m.set_model_sampler_pre_cfg_function(lambda args: args["conds_out"])
    assert len(m.model_options["sampler_pre_cfg_function"]) == 1
    m.set_model_sampler_calc_cond_batch_function(lambda args: None)
    assert callable(m.model_options["sampler_calc_cond_batch_function"])
    src = inspect.getsource(__import__("comfy.samplers").samplers.sampling_function)
    assert 'model_options.get("disable_cfg1_optimization", False)' in src
    assert '"conds_out"' in src and '"cond_scale"' in src  # the pre-CFG args the guider passes too


def test_sampling_helpers(tiny_model):
    import comfy.sample
    import comfy.samplers
    import comfy.utils
    import latent_preview
    import node_helpers

    model = tiny_model[0]
    assert "euler" in comfy.samplers.KSampler.SAMPLERS and "normal" in comfy.samplers.KSampler.SCHEDULERS
    sigmas = comfy.samplers.KSampler(model, steps=4, device=model.load_device, sampler="euler", scheduler="normal",
                                     denoise=1.0, model_options=model.model_options).sigmas
    assert sigmas.shape == (5,) and float(sigmas[-1]) == 0.0
    assert isinstance(comfy.samplers.sampler_object("euler"), comfy.samplers.KSAMPLER)
    latent = comfy.sample.fix_empty_latent_channels(model, torch.zeros(1, 4, 8, 8))
    assert latent.shape == (1, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, 3, None)
    assert torch.equal(noise, comfy.sample.prepare_noise(latent, 3, None)) and noise.shape == latent.shape
    assert _params(comfy.sample.sample)[:9] == ["model", "noise", "steps", "cfg", "sampler_name", "scheduler",
                                                "positive", "negative", "latent_image"]
    assert callable(latent_preview.prepare_callback(model, 4))
    assert isinstance(comfy.utils.PROGRESS_BAR_ENABLED, bool) and _params(comfy.utils.ProgressBar)[:1] == ["total"]
    cond = [[torch.zeros(1, 77, 768), {"a": 1}]]
    out = node_helpers.conditioning_set_values(cond, {"prompt_type": "positive"})
    assert out[0][1] == {"a": 1, "prompt_type": "positive"} and cond[0][1] == {"a": 1}  # a copy


# --- tokenizer / text-encoder internals (nodes/celebbasis/pseudo_words.py, training.py) -------------------------------
def test_tokenizer_internals(tiny_model):
    clip = tiny_model[1]
    cond, tok = clip.cond_stage_model, clip.tokenizer
    key = cond.clip
    assert key == "clip_l" and tok.clip == key and hasattr(cond, key)
    sub = getattr(tok, key)
    assert sub.embedding_key == "clip_l"
    ids = sub.tokenizer("a photo")["input_ids"]
    assert sub.tokens_start == 1 and sub.tokenizer_adds_end_token is True
    assert ids[0] == sub.start_token and ids[-1] == sub.end_token and len(ids) == 4
    assert sub.embedding_directory is None or isinstance(sub.embedding_directory, (str, list))
    assert "return_word_ids" in _params(tok.tokenize_with_weights)
    assert _params(tok.untokenize) == ["token_weight_pair"]
    assert isinstance(tok.state_dict(), dict)


def test_text_encoder_internals(tiny_model):
    clip = tiny_model[1]
    enc = clip.cond_stage_model.clip_l
    assert enc.transformer.get_input_embeddings().weight.shape == (49408, 768)
    tm = enc.transformer.text_model
    assert tm.embeddings.position_embedding.weight.shape == (77, 768)
    layer = tm.encoder.layers[0]
    for name in ("layer_norm1", "layer_norm2", "self_attn", "mlp"):
        assert hasattr(layer, name), name
    assert _params(layer.self_attn.forward)[:3] == ["x", "mask", "optimized_attention"]
    assert hasattr(tm, "final_layer_norm") and enc.layer in ("last", "hidden", "penultimate")
    assert hasattr(enc, "layer_idx") and hasattr(enc, "layer_norm_hidden_state")
    assert getattr(enc, "enable_attention_masks", False) is False and getattr(enc, "zero_out_masked", False) is False
    embeds, *_ = enc.process_tokens([[49406, 320, 49407]], torch.device("cpu"))
    assert embeds.shape[:2] == (1, 3) and embeds.shape[-1] == 768
    clip.cond_stage_model.reset_clip_options()
    clip.cond_stage_model.set_clip_options({"layer": -2})
    clip.cond_stage_model.reset_clip_options()
    assert hasattr(clip, "layer_idx") and hasattr(clip, "patcher") and callable(clip.load_model)
    cond = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    assert cond[0][0].shape == (1, 77, 768)


def test_cast_to_and_attention_for_device():
    import comfy.model_management
    from comfy.ldm.modules.attention import optimized_attention_for_device

    w = torch.ones(2, 3)
    out = comfy.model_management.cast_to(w, dtype=torch.float16, device=torch.device("cpu"))
    assert out.dtype == torch.float16 and torch.equal(out.float(), w)
    attn = optimized_attention_for_device(torch.device("cpu"), mask=True, small_input=True)
    q = torch.randn(1, 5, 8)
    mask = torch.zeros(5, 5)
    assert attn(q, q, q, 2, mask).shape == (1, 5, 8)


# --- attention patch keys (nodes/ipadapter/adapter.py) ----------------------------------------------------------------
def test_attn2_replace_keys_and_extra_options(tiny_model):
    """set_model_attn2_replace stores the patch under transformer_options/patches_replace/attn2/(block, n, i) and
    ComfyUI calls it with (q, k, v, extra_options) holding the keys the IP-Adapter patch reads."""
    import comfy.sample
    import comfy.samplers
    from comfy.ldm.modules import attention

    model = tiny_model[0]
    unet = model.get_model_object("diffusion_model")
    blocks = [(i, m) for i, b in enumerate(unet.input_blocks) for m in b.modules()
              if isinstance(m, attention.SpatialTransformer)]
    assert blocks, "no SpatialTransformer in input_blocks"
    i, st = blocks[0]
    assert st.transformer_blocks[0].attn2.to_k.in_features == 768
    seen = []

    def patch(q, k, v, extra_options):
        seen.append({key: extra_options.get(key) for key in ("n_heads", "original_shape", "activations_shape",
                                                             "cond_or_uncond", "sigmas", "attn_precision")})
        return attention.optimized_attention(q, k, v, extra_options["n_heads"],
                                             attn_precision=extra_options.get("attn_precision"),
                                             transformer_options=extra_options)

    m = model.clone()
    m.set_model_attn2_replace(patch, "input", i, 0)
    assert m.model_options["transformer_options"]["patches_replace"]["attn2"][("input", i, 0)] is patch
    assert "patches_replace" not in model.model_options.get("transformer_options", {})  # the clone only
    cond = [[torch.zeros(1, 77, 768), {}]]
    latent = torch.zeros(1, 4, 8, 8)
    comfy.sample.sample(m, comfy.sample.prepare_noise(latent, 0), 1, 2.0, "euler", "normal", cond, cond, latent,
                        disable_pbar=True, seed=0)
    assert seen, "the attn2 patch was never called"
    first = seen[0]
    assert first["n_heads"] == st.transformer_blocks[0].attn2.heads
    assert tuple(first["original_shape"][-2:]) == (8, 8)
    assert sorted(first["cond_or_uncond"]) == [0, 1]
    assert torch.is_tensor(first["sigmas"]) and first["sigmas"].numel() >= 1  # the step's sigma
    assert "attn_precision" in first


# --- model management, sampling objects, patchers (nodes/faces, celebbasis, ipadapter) --------------------------------
def test_model_management_and_sampling_objects(tiny_model):
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.model_sampling

    for name in ("load_models_gpu", "get_torch_device", "unet_offload_device", "intermediate_device",
                 "throw_exception_if_processing_interrupted", "cast_to"):
        assert callable(getattr(mm, name)), name
    assert mm.get_torch_device() == torch.device("cpu")
    model = tiny_model[0]
    ms = model.get_model_object("model_sampling")
    assert isinstance(ms, comfy.model_sampling.EPS) and not isinstance(ms, comfy.model_sampling.CONST)
    assert ms.sigmas.shape == (1000,)
    assert ms.percent_to_sigma(0.0) > ms.percent_to_sigma(1.0)
    assert "c_crossattn" in inspect.signature(model.model.apply_model).parameters or \
        "kwargs" in inspect.signature(model.model.apply_model).parameters
    net = torch.nn.Linear(2, 2)
    patcher = comfy.model_patcher.ModelPatcher(net, load_device=mm.get_torch_device(),
                                               offload_device=mm.unet_offload_device())
    mm.load_models_gpu([patcher])
    assert patcher.model is net
    clone = model.clone()
    key = next(k for k in clone.model.state_dict() if k.endswith("attn2.to_k.weight"))
    clone.add_weight_wrapper(key, lambda w: w)  # nodes/celebbasis/training.py's grad_safe wraps every weight this way
    assert key in clone.weight_wrapper_patches


def test_aliases_the_pack_no_longer_uses_are_still_aliases():
    """comfy.ops.cast_to is marked for removal upstream; the pack uses comfy.model_management.cast_to."""
    import comfy.model_management
    import comfy.ops

    if hasattr(comfy.ops, "cast_to"):
        assert comfy.ops.cast_to is comfy.model_management.cast_to
    else:
        pytest.skip("comfy.ops.cast_to was removed (the pack does not use it)")


def test_save_image_path_expands_the_server_variables_not_the_front_ends(tmp_path):
    """SaveFaceEmbeds/SaveCelebCoeffs: ``get_save_image_path`` expands %year%...%second% (the alternative the name
    rule offers); ``%date:...%`` is the front end's, expanded only for ComfyUI's own save nodes, and arrives as
    typed (its ':' is refused by py/weights/safe_paths.windows_problem)."""
    import re

    import folder_paths

    full, name, counter, sub, _ = folder_paths.get_save_image_path("ids/%year%-%month%-%day%", str(tmp_path))
    assert re.fullmatch(r"\d{4}-\d\d-\d\d", name) and sub == "ids" and counter == 1
    assert full == str(tmp_path / "ids")
    assert folder_paths.get_save_image_path("%date:yyyy-MM-dd%", str(tmp_path))[1] == "%date:yyyy-MM-dd%"
