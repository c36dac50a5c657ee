"""Reference aggregation (py/ipadapter/aggregate.py): mean/max exact, norm-mean, self-attention permutation invariance
where it holds (exactly N inputs), bootstrap/cut rules, file round trip, unusable rows."""

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
