"""Reference aggregation (py/ipadapter/aggregate.py): mean/max exact, norm-mean, self-attention permutation invariance
where it holds (exactly N inputs), bootstrap/cut rules, file round trip, unusable rows."""

import math

import pytest
import torch

from facecond.py.ipadapter import aggregate as agg


def rows(n=5, d=8, seed=0, t=None):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) if t is None else torch.randn(n, t, d, generator=g)


def trained(d=8, n=5, heads=2, seed=1):
    torch.manual_seed(seed)
    a = agg.SelfAttentionAggregator(d, n, heads)
    torch.nn.init.normal_(a.out.weight, std=0.3)  # as if trained: W_out != 0
    return a.eval()


def test_mean_and_max_are_exact():
    x = torch.tensor([[1.0, -2.0, 3.0], [3.0, 0.0, -1.0], [2.0, 5.0, 1.0]])
    assert torch.equal(agg.aggregate(x, "mean")[0], torch.tensor([[2.0, 1.0, 1.0]]))
    assert torch.equal(agg.aggregate(x, "max")[0], torch.tensor([[3.0, 5.0, 3.0]]))
    x3 = rows(4, t=3)
    assert torch.equal(agg.aggregate(x3, "max")[0], x3.amax(0, keepdim=True))


def test_norm_mean_weighs_rows_equally_and_keeps_the_mean_norm():
    x = torch.tensor([[10.0, 0.0], [0.0, 1.0]])
    out = agg.aggregate(x, "norm-mean")[0]
    torch.testing.assert_close(out, torch.tensor([[0.5, 0.5]]) * 5.5)


def test_self_attention_is_permutation_invariant_with_exactly_n_inputs():
    a, x = trained(), rows(5)
    out = agg.aggregate(x, "self-attention", a)[0]
    for perm in ([4, 3, 2, 1, 0], [1, 0, 3, 4, 2]):
        torch.testing.assert_close(agg.aggregate(x[perm], "self-attention", a)[0], out, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(out, x.mean(0, keepdim=True), atol=1e-3)  # it is not just the mean
    # per-position for hidden states (N, T, D): each of the T positions is aggregated on its own
    x3 = rows(5, t=3)
    out3 = agg.aggregate(x3, "self-attention", a)[0]
    assert out3.shape == (1, 3, 8)
    torch.testing.assert_close(out3[:, 1], agg.aggregate(x3[:, 1], "self-attention", a)[0], atol=1e-6, rtol=1e-6)


def test_untrained_self_attention_is_the_mean():
    a = agg.SelfAttentionAggregator(8, 5)
    x = rows(5)
    torch.testing.assert_close(agg.aggregate(x, "self-attention", a)[0], x.mean(0, keepdim=True))


def test_fewer_inputs_are_bootstrapped_with_the_seed_more_are_cut():
    x = rows(3)
    fitted, note = agg.fit_count(x, 5, seed=7)
    assert fitted.shape == (5, 8) and torch.equal(fitted[:3], x) and "bootstrapped to 5" in note
    assert all(any(torch.equal(r, s) for s in x) for r in fitted[3:])
    assert torch.equal(agg.fit_count(x, 5, seed=7)[0], fitted)  # same seed, same draw
    cut, note = agg.fit_count(rows(7), 5)
    assert torch.equal(cut, rows(7)[:5]) and "cut to the first 5" in note
    a = trained()
    out_a, out_b = (agg.aggregate(x, "self-attention", a, seed=s)[0] for s in (7, 7))
    assert torch.equal(out_a, out_b)


def test_aggregator_file_round_trip_and_errors(tmp_path):
    a = trained(heads=2)
    agg.save_aggregator(a, tmp_path / "a.safetensors")
    b = agg.load_aggregator(tmp_path / "a.safetensors")
    assert int(b.n_refs) == 5 and int(b.heads) == 2
    x = rows(5)
    torch.testing.assert_close(agg.aggregate(x, "self-attention", b)[0], agg.aggregate(x, "self-attention", a)[0])
    with pytest.raises(ValueError, match="takes 8-d"):
        agg.aggregate(rows(5, d=4), "self-attention", b)
    with pytest.raises(ValueError, match="needs trained aggregator"):
        agg.aggregate(x, "self-attention")


def test_unusable_rows_are_found():
    x = rows(4)
    x[1] = float("nan")
    x[3] = 0
    assert agg.usable_rows(x) == ([0, 2], [1, 3])


# --- the two self-attention modes --------------------------------------------------------------------------------
SWAP = torch.tensor([[0.0, 1.0], [1.0, 0.0]])


def algorithm_1(attention="paper"):
    """N = 2, D = 2: W_q = W_k = W_v = I, W_out = the swap matrix (symmetric, so nn.Linear's x·Wᵀ is x·W_out)."""
    a = agg.SelfAttentionAggregator(2, 2, attention=attention)
    with torch.no_grad():
        for lin in (a.q, a.k, a.v):
            lin.weight.copy_(torch.eye(2))
        a.out.weight.copy_(SWAP)
    return a.eval()


def test_paper_mode_is_algorithm_1_by_hand():
    # X = [[2, 0], [0, 1]]: Q = K = V = X, Q·Kᵀ = [[4, 0], [0, 1]], scaled by 1/√2.
    # row 0 weights [p0, 1 - p0], p0 = e^(4/√2) / (e^(4/√2) + 1) = 0.944193; Z_0 = [2 p0, 1 - p0]
    # row 1 weights [1 - p1, p1], p1 = e^(1/√2) / (e^(1/√2) + 1) = 0.669761; Z_1 = [2 (1 - p1), p1]
    # Z·W_out swaps the columns: [1 - p0, 2 p0] and [p1, 2 (1 - p1)]; their mean: [0.362784, 1.274432]
    x = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    p0, p1 = math.exp(4 / math.sqrt(2)) / (math.exp(4 / math.sqrt(2)) + 1), math.exp(1 / math.sqrt(2)) / (
        math.exp(1 / math.sqrt(2)) + 1)
    assert (p0, p1) == pytest.approx((0.944193, 0.669761), abs=1e-6)
    a = algorithm_1()
    tokens = a.tokens(x[None])[0]  # Algorithm 1's return value, one row per reference
    torch.testing.assert_close(tokens, torch.tensor([[1 - p0, 2 * p0], [p1, 2 * (1 - p1)]]), atol=1e-6, rtol=0)
    out, note = agg.aggregate(x, "self-attention", a)
    torch.testing.assert_close(out, torch.tensor([[0.362784, 1.274432]]), atol=1e-5, rtol=0)
    assert "paper mode" in note
    # residual mode, same weights (b_out = 0): the mean of the references is added, nothing else differs
    r = algorithm_1("residual")
    torch.testing.assert_close(agg.aggregate(x, "self-attention", r)[0], torch.tensor([[1.362784, 1.774432]]),
                               atol=1e-5, rtol=0)


def test_paper_mode_has_no_bias_and_starts_as_an_attention_average():
    a = agg.SelfAttentionAggregator(8, 3, attention="paper")
    assert set(a.state_dict()) == {"q.weight", "k.weight", "v.weight", "out.weight", "n_refs", "heads"}
    assert torch.equal(a.v.weight, torch.eye(8)) and torch.equal(a.out.weight, torch.eye(8))
    same = rows(1).expand(3, -1)  # three equal references: any attention average is that reference
    torch.testing.assert_close(agg.aggregate(same, "self-attention", a.eval())[0], same[:1])
    with pytest.raises(ValueError, match="attention must be one of"):
        agg.SelfAttentionAggregator(8, 3, attention="Algorithm 1")


def test_the_mode_is_in_the_file_and_old_files_load_as_residual(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from facecond.py.weights.packfile import PackFileError

    a = algorithm_1()
    agg.save_aggregator(a, tmp_path / "p.safetensors", {"refs": "2"})
    with safe_open(str(tmp_path / "p.safetensors"), framework="pt") as f:
        assert f.metadata() == {"refs": "2", "attention": "paper"}
    b = agg.load_aggregator(tmp_path / "p.safetensors")
    x = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    assert b.attention == "paper" and b.trained_with == ""
    torch.testing.assert_close(agg.aggregate(x, "self-attention", b)[0], torch.tensor([[0.362784, 1.274432]]),
                               atol=1e-5, rtol=0)
    old = {k: v.clone() for k, v in algorithm_1("residual").state_dict().items()}
    save_file(old, str(tmp_path / "old.safetensors"))  # a file from before the mode existed: no metadata
    assert agg.load_aggregator(tmp_path / "old.safetensors").attention == "residual"
    save_file(old, str(tmp_path / "bad.safetensors"), metadata={"attention": "other"})
    with pytest.raises(PackFileError, match="unknown self-attention mode 'other'"):
        agg.load_aggregator(tmp_path / "bad.safetensors")
    save_file(old, str(tmp_path / "mixed.safetensors"), metadata={"attention": "paper"})  # paper has no out.bias
    with pytest.raises(PackFileError, match="do not make one aggregator"):
        agg.load_aggregator(tmp_path / "mixed.safetensors")
    # inside a full IP-Adapter file (--train adapter): the aggregator.* tensors
    full = {"image_proj.norm.weight": torch.ones(2), "ip_adapter.1.to_k_ip.weight": torch.ones(2, 2),
            **agg.aggregator_tensors(a, agg.FILE_PREFIX)}
    save_file(full, str(tmp_path / "full.safetensors"), metadata={"attention": "paper"})
    c = agg.load_aggregator(tmp_path / "full.safetensors")
    assert c.attention == "paper" and torch.equal(c.out.weight, SWAP)
    agg.save_aggregator(a, tmp_path / "t.safetensors", {"ipadapter": "mine.safetensors"})
    note = agg.aggregate(x, "self-attention", agg.load_aggregator(tmp_path / "t.safetensors"))[1]
    assert note.startswith("self-attention (paper mode, trained with IP-Adapter mine.safetensors): 2 references")
