"""scripts/train_aggregator.py's --train flag on the tiny SD1.5 checkpoint and real photos (johns/): one Adam step
moves exactly the parameters that got a gradient, so what changed is what trained. --train aggregator: G only;
--train adapter: G + the IP-Adapter's projection (Linear/MLP + LayerNorm) + every W'_k, W'_v, on a copy. The U-Net,
and the loaded IP-Adapter, are bit-identical afterwards in both cases."""

from __future__ import annotations

import os

import folder_paths
import pytest
import torch
from safetensors.torch import save_file

from facecond.nodes.ipadapter.adapter import LoadIPAdapter, cross_attention_layers
from facecond.py.ipadapter import finetune
from facecond.py.ipadapter.aggregate import ATTENTION_MODES, SelfAttentionAggregator
from facecond_dev.random_weights import random_state_dict

D = 128


@pytest.fixture(scope="module")
def setup(tiny_model, stand_in_models, shared_data):
    import train_aggregator as ta

    from facecond_dev import host

    model, clip, vae = tiny_model
    layers = cross_attention_layers(model)
    sd = random_state_dict("faceid", D, [inner for _, inner, _ in layers], cross_dim=layers[0][2], seed=5, scale=0.5)
    folder = folder_paths.get_folder_paths("ipadapter")[0]
    os.makedirs(folder, exist_ok=True)
    save_file(sd, os.path.join(folder, "ipa_train_flags.safetensors"))
    adapter = LoadIPAdapter().load("ipa_train_flags.safetensors")[0]
    data = shared_data / "faces" / "johns"
    train_names, _ = ta.split_people([p.name for p in data.iterdir() if p.is_dir()], seed=0)
    people = ta.build_people(data, train_names, model, clip, vae, adapter, size=64, caption="a photo of a man",
                             recogniser=host.STAND_IN_RECOGNISER, clip_vision=None, max_images=3)
    return ta, model, adapter, people


def snapshot(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in tensors.items()}


@pytest.mark.parametrize("what", ["aggregator", "adapter"])
def test_one_step_moves_exactly_the_trainable_set(setup, what):
    ta, model, adapter, people = setup
    unet = model.model.diffusion_model
    unet_before = snapshot(dict(unet.state_dict()))
    ipa_before = snapshot(finetune.trainable_params(adapter))
    torch.manual_seed(0)
    g_init = snapshot(dict(SelfAttentionAggregator(D, 3, 1, "paper").named_parameters()))  # what train() starts from
    g, tuned, losses, _ = ta.train(people, [], model, adapter, n_refs=3, heads=1, steps=1, lr=1e-3, seed=0,
                                   eval_rounds=0, attention="paper", train_what=what)
    assert len(losses) == 1 and g.attention == "paper" and ta.ATTENTION_CHOICES == ATTENTION_MODES
    # G: every tensor moved (Adam moves a parameter by about lr wherever its gradient is non-zero)
    for name, p in g.named_parameters():
        assert (p - g_init[name]).abs().min() > 0, name
    # the U-Net: untouched, and no gradient was ever stored on it
    for name, t in unet.state_dict().items():
        assert torch.equal(t, unet_before[name]), name
    assert all(p.grad is None for p in unet.parameters())
    # the loaded IP-Adapter (cached, shared with other nodes): untouched either way
    for name, t in finetune.trainable_params(adapter).items():
        assert torch.equal(t, ipa_before[name]), name
    if what == "aggregator":
        assert tuned is adapter
    else:  # the copy's projection and every W'_k, W'_v moved
        after = finetune.trainable_params(tuned)
        assert set(after) == set(ipa_before) and len(after) == 6 + 2 * len(adapter.kv)
        moved = {n for n, t in after.items() if (t - ipa_before[n]).abs().max() > 0}
        assert moved == set(after)
        assert not any(t.requires_grad for t in after.values())  # handed back frozen
