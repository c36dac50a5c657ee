"""The tiny family checkpoints (scripts/facecond_dev/tiny_model.py): ComfyUI's own loader detects each as its family,
with the text encoders that family's config fixes, and one 64 px step samples and decodes."""

from __future__ import annotations

import pytest
import torch

EXPECTED = {  # family -> (supported_models class, ModelType name, model_base class, CLIP class, context width)
    "sd2": ("SD20", "EPS", "BaseModel", "SD2ClipModel", 1024),
    "sd2v": ("SD20", "V_PREDICTION", "BaseModel", "SD2ClipModel", 1024),
    "sdxl": ("SDXL", "EPS", "SDXL", "SDXLClipModel", 2048),
}


def test_family_checkpoint_is_detected_as_its_family(family, family_model):
    model, clip, _vae = family_model
    config_cls, model_type, base_cls, clip_cls, width = EXPECTED[family]
    assert type(model.model.model_config).__name__ == config_cls
    assert model.model.model_type.name == model_type
    assert type(model.model).__name__ == base_cls
    assert type(clip.cond_stage_model).__name__ == clip_cls
    assert model.model.model_config.unet_config["context_dim"] == width


def test_family_encodes_samples_and_decodes(family, family_model, family_cond):
    import nodes

    model, _clip, vae = family_model
    cond = family_cond
    tokens, extra = cond[0]
    assert tokens.shape == (1, 77, EXPECTED[family][4])
    if family == "sdxl":  # CLIP-G's projected pooled output: what the U-Net's ADM vector y is built from
        assert extra["pooled_output"].shape == (1, 1280)
    latent = nodes.EmptyLatentImage().generate(64, 64, 1)[0]
    out = nodes.KSampler().sample(model, 0, 1, 1.0, "euler", "normal", cond, cond, latent, denoise=1.0)[0]
    samples = out["samples"]
    assert samples.shape == (1, 4, 8, 8) and torch.isfinite(samples).all()
    assert not torch.equal(samples, latent["samples"])
    image = vae.decode(samples)
    assert image.shape == (1, 64, 64, 3) and torch.isfinite(image).all() and float(image.std()) > 0


@pytest.mark.family  # 5-13 s of seeded randn: one host is enough
def test_sd15_tiny_checkpoint_is_unchanged(comfy_base):
    """The SD1.5 file of the family builder is SD1.5's own: same tensors for the same seed (its bytes are pinned by
    the cache other tests and workflows share)."""
    from safetensors.torch import load_file

    from facecond_dev import host
    from facecond_dev.tiny_model import build_family_state_dict

    data = host.shared_data()
    taesd = data / "models" / "taesd" if data and (data / "models" / "taesd").is_dir() else None
    built = build_family_state_dict("sd15", taesd_dir=taesd, seed=0)
    cached = load_file(str(host.tiny_checkpoint_path()))
    assert built.keys() == cached.keys()
    assert all(torch.equal(built[k], cached[k]) for k in built)


def test_unknown_family_is_refused():
    from facecond_dev.tiny_model import build_family_state_dict

    with pytest.raises(ValueError, match=r"unknown tiny checkpoint family 'sd3'.*sd15, sd2, sd2v, sdxl"):
        build_family_state_dict("sd3")
