"""Metric maths of the evaluation protocols (py/evaluate/metrics.py) against hand computations."""

import math

import numpy as np
import pytest
import torch

from facecond.py.evaluate import fidelity
from facecond.py.evaluate import metrics as m


def test_cosine_and_reference_modes_by_hand():
    gen = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    ref = torch.tensor([[3.0, 4.0], [1.0, 0.0]])  # unit: (0.6, 0.8), (1, 0)
    # image 0: cosines 0.6 and 1.0; image 1: 0.8 and 0.0
    assert m.reference_cosines(gen, ref, "mean").tolist() == pytest.approx([0.8, 0.4])
    assert m.reference_cosines(gen, ref, "max").tolist() == pytest.approx([1.0, 0.8])
    c = np.array([1.6, 0.8]) / math.hypot(1.6, 0.8)  # mean of the unit references, normalised
    assert m.reference_cosines(gen, ref, "centroid").tolist() == pytest.approx([c[0], c[1]])
    assert m.cosine(torch.tensor([1.0, 1.0]), torch.tensor([2.0, 0.0])).item() == pytest.approx(2 ** -0.5)
    with pytest.raises(ValueError, match="reference mode"):
        m.reference_cosines(gen, ref, "median")
    with pytest.raises(ValueError, match="M >= 1"):
        m.reference_cosines(gen, ref[:0], "mean")


def test_paper_aggregates():
    # Livshits eq. 4 and Face0 Table 2 (0.24 text + 0.72 face = 0.96 overall)
    assert m.livshits_score(0.3, 0.4) == pytest.approx(1.3 * 1.4)
    assert m.face0_overall(0.24, 0.72) == pytest.approx(0.96)
    assert m.aggregate("livshits", 0.25, 0.5) == pytest.approx(1.875)
    assert math.isnan(m.aggregate("face0", 0.2, float("nan")))
    with pytest.raises(ValueError, match="aggregate must be"):
        m.aggregate("dreambooth", 0.1, 0.1)


def test_best_of_n_skips_faceless_and_empty_groups():
    nan = float("nan")
    values = [0.1, 0.5, 0.3, nan, 0.2, nan, nan]
    groups = ["a", "a", "b", "b", "c", "d", "d"]
    r = m.best_of_n(values, groups)
    assert r.best == pytest.approx((0.5 + 0.3 + 0.2) / 3)  # group d has no value and does not count
    assert r.mean == pytest.approx((0.1 + 0.5 + 0.3 + 0.2) / 4)
    assert (r.groups, r.counted, r.missing) == (3, 4, 3)
    assert math.isnan(m.best_of_n([nan], [0]).best)
    with pytest.raises(ValueError, match="group labels"):
        m.best_of_n([0.1], [0, 1])


def test_inception_score_on_a_toy_distribution():
    # Two images, three classes, p(y|x) given exactly through log-probabilities.
    p = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], dtype=torch.float64)
    q = p.mean(0)
    kl_marg = [(p[i] * (p[i] / q).log()).sum().item() for i in range(2)]
    kl_unif = [(p[i] * (p[i] * 3).log()).sum().item() for i in range(2)]
    is_m, std = m.inception_score(p.log(), "marginal")
    assert is_m == pytest.approx(math.exp(sum(kl_marg) / 2)) and std == 0.0
    assert m.inception_score(p.log(), "uniform")[0] == pytest.approx(math.exp(sum(kl_unif) / 2))
    # one-hot, all different classes: IS = number of classes under both priors; all the same class: 1 vs C
    onehot = torch.eye(4, dtype=torch.float64) * 60.0
    assert m.inception_score(onehot, "marginal")[0] == pytest.approx(4.0, rel=1e-6)
    assert m.inception_score(onehot, "uniform")[0] == pytest.approx(4.0, rel=1e-6)
    same = torch.zeros(5, 4, dtype=torch.float64)
    same[:, 2] = 60.0
    assert m.inception_score(same, "marginal")[0] == pytest.approx(1.0, rel=1e-6)
    assert m.inception_score(same, "uniform")[0] == pytest.approx(4.0, rel=1e-6)
    # splits: mean and std over chunks
    both = torch.cat([onehot, same[:4]])
    mean, std = m.inception_score(both, "marginal", splits=2)
    assert (mean, std) == (pytest.approx(2.5, rel=1e-6), pytest.approx(1.5, rel=1e-6))
    names = fidelity.inception_scores(both, splits=2)
    assert names["is_marginal"] == pytest.approx(2.5, rel=1e-6) and names["is_uniform"] == pytest.approx(4.0, 1e-6)


def test_frechet_distance_by_hand_and_against_torch_fidelity():
    # diagonal covariances: FID = |dmu|^2 + sum (s1 + s2 - 2 sqrt(s1 s2))
    mu1, mu2 = np.array([0.0, 1.0]), np.array([3.0, 1.0])
    s1, s2 = np.diag([4.0, 1.0]), np.diag([1.0, 9.0])
    want = 9.0 + (4 + 1 - 2 * 2) + (1 + 9 - 2 * 3)
    assert m.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want)
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(50, 6)), rng.normal(0.5, 2.0, size=(40, 6))
    metric_fid = pytest.importorskip("torch_fidelity.metric_fid")
    ref = metric_fid.fid_statistics_to_metric(
        {"mu": a.mean(0), "sigma": np.cov(a, rowvar=False)}, {"mu": b.mean(0), "sigma": np.cov(b, rowvar=False)},
        False)["frechet_inception_distance"]
    assert fidelity.fid(a, b) == pytest.approx(ref, rel=1e-9)
    assert fidelity.fid(a, a) == pytest.approx(0.0, abs=1e-8)


def test_inception_weights_missing_is_a_clear_error(tmp_path, monkeypatch):
    pytest.importorskip("torch_fidelity")
    with pytest.raises(FileNotFoundError, match=r"Inception weights .* not found; download https://"):
        fidelity.load_inception(tmp_path / "nope.pth")
    monkeypatch.setenv("FACECOND_OFFLINE", "1")
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))  # an empty torch hub cache
    try:
        with pytest.raises(RuntimeError, match=r"FACECOND_OFFLINE=1. Download https://.*--inception-weights"):
            fidelity.load_inception(None)
    finally:
        torch.hub.set_dir(old)
