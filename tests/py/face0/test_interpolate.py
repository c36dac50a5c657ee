"""Face-embedding arithmetic (py/face0/interpolate.py, Face0 §3.2/§4) and embedding files (py/face0/embeds_io.py)."""

import math

import pytest
import torch

from facecond.py.face0.embeds_io import load_embeds, save_embeds
from facecond.py.face0.interpolate import add_noise, direction_edit, fit_prior, lerp, slerp, weighted_mean
from facecond.py.faces.types import FaceEmbeds


def _unit(n, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)


def test_lerp_endpoints_midpoint_and_extrapolation():
    e0, e1 = _unit(2, seed=1), _unit(2, seed=2)
    out = lerp(e0, e1, [0.0, 0.5, 1.0, 1.5, -0.5])  # (T·N, D), t outer
    torch.testing.assert_close(out[0:2], e0)
    torch.testing.assert_close(out[2:4], (e0 + e1) / 2)
    torch.testing.assert_close(out[4:6], e1)
    torch.testing.assert_close(out[6:8], e1 + 0.5 * (e1 - e0))
    torch.testing.assert_close(out[8:10], e0 - 0.5 * (e1 - e0))
    assert torch.allclose(lerp(e0, e1, 0.5, normalized=True).norm(dim=-1), torch.ones(2, dtype=torch.float64))


def test_slerp_stays_on_sphere_at_constant_angular_speed():
    e0, e1 = _unit(1, seed=3), _unit(1, seed=4)
    omega = math.acos(float((e0 * e1).sum()))
    ts = torch.tensor([0.0, 0.25, 0.5, 1.0, 1.5], dtype=torch.float64)
    out = slerp(e0, e1, ts)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(5, dtype=torch.float64))
    torch.testing.assert_close(out[0:1], e0)
    torch.testing.assert_close(out[3:4], e1)
    angles = torch.acos((out * e0).sum(-1).clamp(-1, 1))
    torch.testing.assert_close(angles[:3], ts[:3] * omega)
    # t = 1.5 keeps turning past e1 along the same circle
    torch.testing.assert_close(torch.acos((out[4] * e1[0]).sum().clamp(-1, 1)), torch.tensor(0.5 * omega,
                               dtype=torch.float64))
    # parallel inputs fall back to lerp (no NaN)
    assert torch.isfinite(slerp(e0, e0 * 2, 0.5)).all()


def test_weighted_mean_direction_and_noise():
    x = _unit(3, seed=5)
    torch.testing.assert_close(weighted_mean(x, [1, 1, 2]), ((x[0] + x[1] + 2 * x[2]) / 4)[None])
    with pytest.raises(ValueError, match="3 embeddings"):
        weighted_mean(x, [1, 2])
    torch.testing.assert_close(direction_edit(x, x[:1], x[1:2], 0.5), x + 0.5 * (x[1:2] - x[:1]))
    n1, n2, n3 = add_noise(x, 0.1, seed=9), add_noise(x, 0.1, seed=9), add_noise(x, 0.1, seed=10)
    assert torch.equal(n1, n2) and not torch.equal(n1, n3)
    assert 0.1 < float((n1 - x).std()) * 10 < 2.0
    torch.testing.assert_close(add_noise(x, 0.1, 9, normalized=True).norm(dim=-1), torch.ones(3, dtype=torch.float64))


def test_prior_fit_and_seeded_sampling():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 8, generator=g) * 0.1 + 1
    b = torch.randn(200, 8, generator=g) * 0.1 - 1
    prior = fit_prior(torch.cat([a, b]), components=2, seed=0)
    assert sorted(prior.means[:, 0].round().tolist()) == [-1.0, 1.0]
    assert torch.allclose(prior.weights, torch.tensor([0.5, 0.5]), atol=0.01)
    assert torch.allclose(prior.stds, torch.full((2, 8), 0.1), atol=0.03)
    s1, s2, s3 = prior.sample(4, seed=1), prior.sample(4, seed=1), prior.sample(4, seed=2)
    assert torch.equal(s1, s2) and not torch.equal(s1, s3)
    assert ((s1[:, 0].abs() - 1).abs() < 0.5).all()  # every draw belongs to one of the two clusters
    one = fit_prior(a, components=1)
    torch.testing.assert_close(one.means[0], a.mean(0))
    with pytest.raises(ValueError, match="at least 2"):
        fit_prior(a[:1])


def test_embeds_file_round_trip(tmp_path):
    fe = FaceEmbeds(embeds=_unit(3).float(), model="test/emb@123", normalized=True, source_index=(0, 2, -1))
    save_embeds(fe, tmp_path / "id.safetensors", source="three photos")
    back, meta = load_embeds(tmp_path / "id.safetensors")
    assert back.model == fe.model and back.normalized and back.source_index == fe.source_index
    assert torch.equal(back.embeds, fe.embeds)
    assert meta["source"] == "three photos" and meta["dim"] == "16" and meta["count"] == "3"
