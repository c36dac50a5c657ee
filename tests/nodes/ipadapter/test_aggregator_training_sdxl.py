"""scripts/train_aggregator.py on an SDXL IP-Adapter (the tiny SDXL checkpoint, real photos from johns/): both
``--train aggregator`` and ``--train adapter`` run a step through the one denoiser call with SDXL's ADM vector y,
their files are written as the CLI writes them (``save_outputs``), load in AggregateEmbeds / LoadIPAdapter, and change
what the model predicts. The adapter is a random-weight FaceID file in the published layout (a ``.bin`` of nested
``image_proj`` / ``ip_adapter`` dicts), sized from the checkpoint's 70 cross-attentions. ``--attention residual``
starts at mean pooling (W_out = 0), so any change against mean pooling is what the step trained.
Cheap by design: 64 px, 3 photos of one person, one SDXL caption encode (cached), 1 step, the mean-pooling reference
sampled once."""

from __future__ import annotations

import math
import os

import folder_paths
import pytest
import torch

import nodes
from facecond.nodes.ipadapter.adapter import ApplyIPAdapter, IPAdapterEncode, LoadIPAdapter, cross_attention_layers
from facecond.nodes.ipadapter.aggregate import AggregateEmbeds
from facecond.py.faces.types import FaceEmbeds
from facecond.py.ipadapter import finetune
from facecond_dev import host
from facecond_dev.random_weights import random_state_dict

pytestmark = pytest.mark.parametrize("family", ["sdxl"], indirect=True)

D = 128
SOURCE = "ip-adapter-faceid_sdxl_trainer_test.bin"


@pytest.fixture(scope="module")
def sdxl_setup(family_model, stand_in_models, shared_data):
    import train_aggregator as ta

    model, clip, vae = family_model
    layers = cross_attention_layers(model)
    assert len(layers) == 70 and {c for _, _, c in layers} == {2048}
    sd = random_state_dict("faceid", D, [inner for _, inner, _ in layers], cross_dim=2048, seed=5, scale=0.5)
    folder = folder_paths.get_folder_paths("ipadapter")[0]
    os.makedirs(folder, exist_ok=True)
    source = os.path.join(folder, SOURCE)
    torch.save({p: {k[len(p) + 1:]: v for k, v in sd.items() if k.startswith(p + ".")}
                for p in ("image_proj", "ip_adapter")}, source)  # the published .bin layout
    adapter = LoadIPAdapter().load(SOURCE)[0]
    people = ta.build_people(shared_data / "faces" / "johns", ["John_Salley"], model, clip, vae, adapter, size=64,
                             caption="a photo of a man", recogniser=host.STAND_IN_RECOGNISER, clip_vision=None,
                             max_images=3)
    assert len(people) == 1 and people[0].adms is not None and people[0].adms.shape[1] == 2816  # y per image
    return ta, model, adapter, people, source


def _refs(adapter, n=3):
    x = torch.nn.functional.normalize(torch.randn(n, D, generator=torch.Generator().manual_seed(7)), dim=-1)
    fe = FaceEmbeds(embeds=x, model="test/embedder", normalized=True, source_index=tuple(range(n)))
    return IPAdapterEncode().encode(adapter, "center", face_embeds=fe)[0]


def _one_step(model, positive):
    latent = nodes.EmptyLatentImage().generate(64, 64, 1)[0]
    with torch.inference_mode():
        return nodes.KSampler().sample(model, 3, 1, 1.0, "euler", "normal", positive, positive, latent)[0]["samples"]


@pytest.fixture(scope="module")
def mean_reference(sdxl_setup, family_cond):
    """(mean-pooled embeds into the source adapter, one sampling step with them): what an untrained G gives."""
    _, model, adapter, _, _ = sdxl_setup
    mean = AggregateEmbeds().aggregate(_refs(adapter), "mean", "none", 0)[0]
    return mean, _one_step(ApplyIPAdapter().apply(model, adapter, mean, 1.0, 0.0, 1.0)[0], family_cond)


@pytest.mark.parametrize("what", ["aggregator", "adapter"])
def test_sdxl_training_writes_files_that_load_and_change_the_output(sdxl_setup, family_cond, mean_reference, what):
    ta, model, adapter, people, source = sdxl_setup
    ipa_before = {k: v.detach().clone() for k, v in finetune.trainable_params(adapter).items()}
    g, tuned, losses, test = ta.train(people, [], model, adapter, n_refs=3, heads=1, steps=1, lr=1e-2, seed=0,
                                      eval_rounds=0, attention="residual", train_what=what)
    assert len(losses) == 1 and all(math.isfinite(v) for v in losses)
    name = f"agg_sdxl_{what}"
    written = ta.save_outputs(g, tuned, adapter, losses, test, people, [], name=name, source_name=SOURCE,
                              source_path=source, train_what=what, refs=3)
    assert [p.name for p in written] == [f"{name}.safetensors"] * (1 if what == "aggregator" else 2)
    assert all(torch.equal(t, ipa_before[k]) for k, t in finetune.trainable_params(adapter).items())  # source kept
    used = adapter if what == "aggregator" else LoadIPAdapter().load(f"{name}.safetensors")[0]
    assert len(used.kv) == 70
    refs = _refs(used)
    trained = AggregateEmbeds().aggregate(refs, "self-attention", f"{name}.safetensors", 0)[0]
    mean, out_mean = mean_reference
    assert not torch.allclose(trained.embeds, mean.embeds)  # G moved off mean pooling
    out_trained = _one_step(ApplyIPAdapter().apply(model, used, trained, 1.0, 0.0, 1.0)[0], family_cond)
    assert torch.isfinite(out_trained).all() and not torch.allclose(out_trained, out_mean)
