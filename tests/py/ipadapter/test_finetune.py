"""py/ipadapter/finetune.py: the trainable copy of an IP-Adapter (the paper's "Linear, Layer Norm и Cross-Attention"),
its parameter names (the file layout), and the complete IP-Adapter file written from it."""

import torch

from facecond.py.ipadapter import adapter as ipa
from facecond.py.ipadapter import finetune
from facecond.py.ipadapter.aggregate import FILE_PREFIX
from facecond_dev.random_weights import random_state_dict

LAYERS = [8, 16, 8]


def loaded(kind="plain", width=6):
    sd = random_state_dict(kind, width, LAYERS, cross_dim=4, tokens=2, seed=3, scale=0.5)
    return sd, ipa.from_state_dict(sd, "t.safetensors")


def test_trainable_copy_is_a_fresh_leaf_copy_and_leaves_the_loaded_adapter_alone():
    sd, a = loaded()
    t = finetune.trainable_copy(a)
    params = finetune.trainable_params(t)
    # exactly the file's tensors: the projection (Linear proj + LayerNorm norm) and every W'_k, W'_v
    assert set(params) == set(sd) == {"image_proj.proj.weight", "image_proj.proj.bias", "image_proj.norm.weight",
                                      "image_proj.norm.bias", *(f"ip_adapter.{i}.to_{w}_ip.weight"
                                                                for i in (1, 3, 5) for w in "kv")}
    assert all(p.is_leaf and p.requires_grad for p in params.values())
    with torch.no_grad():
        for p in params.values():
            p.add_(1.0)
    assert not any(p.requires_grad for p in a.proj.parameters())
    for name, p in finetune.trainable_params(a).items():  # the loaded (cached, shared) adapter is untouched
        assert torch.equal(p, sd[name].float()), name


def test_gradient_reaches_the_projection_and_every_k_v():
    _, a = loaded("faceid", 6)
    t = finetune.trainable_copy(a)
    tokens = t.proj(torch.randn(1, 6, generator=torch.Generator().manual_seed(0)))  # (1, 2, 4)
    terms = ipa.layer_terms(t, tokens, tokens.detach() * 0, 1.0, float("inf"), 0.0, None)
    loss = sum(((term.k ** 2).sum() + term.v.sum()) for term in terms)
    params = finetune.trainable_params(t)
    grads = torch.autograd.grad(loss, list(params.values()))
    assert [n for n, g in zip(params, grads) if not g.abs().sum() > 0] == []
    # W'_v enters as c_i·W'_vᵀ summed: d/dW'_v = column sums of the tokens, the same for every output row
    tok_sum = tokens.detach()[0].sum(0)
    torch.testing.assert_close(grads[list(params).index("ip_adapter.1.to_v_ip.weight")],
                               tok_sum.expand(LAYERS[0], -1))


def test_the_written_file_is_a_complete_adapter_the_loader_reads():
    sd, a = loaded()
    t = finetune.trainable_copy(a)
    with torch.no_grad():
        t.kv[1][0].mul_(2)  # "trained"
    source = {**sd, "lora.down": torch.ones(2), f"{FILE_PREFIX}q.weight": torch.ones(6, 6)}
    out = finetune.adapter_file_tensors(t, source)
    assert set(out) == set(sd) | {"lora.down"}  # other tensors carried over; an old aggregator is not
    assert torch.equal(out["lora.down"], torch.ones(2)) and torch.equal(out["ip_adapter.3.to_k_ip.weight"],
                                                                         2 * sd["ip_adapter.3.to_k_ip.weight"])
    b = ipa.from_state_dict(out, "tuned.safetensors")
    assert b.variant == a.variant and torch.equal(b.kv[1][0], 2 * a.kv[1][0]) and torch.equal(b.kv[0][1], a.kv[0][1])
