"""Face0's three-way guidance maths (py/face0/guidance.py) against hand computations (Valevski et al. 2023, §3.3)."""

import pytest
import torch

from facecond.py.face0.guidance import branch_weights, three_way_cfg


def _preds(seed=0, shape=(2, 4, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(4)]  # df, d, f, uncond


def test_formula_matches_hand_computation():
    df, d, f, u = _preds()
    w, c, a = 7.5, 0.4, 0.3
    expected_tilde = c * df + (1 - c) * (a * f + (1 - a) * d)
    expected = w * expected_tilde + (1 - w) * u
    out = three_way_cfg(branch_weights(w, c, a), df, d, f, u)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    # the branch weights of ε̂ sum to 1 (so combining x0 = x − σε is the same as combining ε)
    bw = branch_weights(w, c, a)
    assert bw.text_face + bw.text + bw.face == pytest.approx(1.0)
    x, sigma = torch.randn_like(df), 3.7
    out_x0 = three_way_cfg(bw, x - sigma * df, x - sigma * d, x - sigma * f, x - sigma * u)
    torch.testing.assert_close(out_x0, x - sigma * out, rtol=1e-10, atol=1e-10)


def test_c1_is_plain_cfg_bit_for_bit():
    df, _, _, u = (t.float() for t in _preds(1))
    w = 7.5
    out = three_way_cfg(branch_weights(w, 1.0, 0.37), df, None, None, u)
    assert torch.equal(out, u + (df - u) * w)  # ComfyUI cfg_function's exact arithmetic
    assert branch_weights(w, 1.0, 0.37).needed() == {"text_face": True, "uncond": True, "text": False, "face": False}


@pytest.mark.parametrize(("a", "skipped", "kept"), [(0.0, "face", "text"), (1.0, "text", "face")])
def test_a_limits(a, skipped, kept):
    df, d, f, u = _preds(2)
    w, c = 5.0, 0.3
    bw = branch_weights(w, c, a)
    need = bw.needed()
    assert not need[skipped] and need[kept] and need["text_face"] and need["uncond"]
    other = d if kept == "text" else f
    expected = w * (c * df + (1 - c) * other) + (1 - w) * u
    out = three_way_cfg(bw, df, d if kept == "text" else None, f if kept == "face" else None, u)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_c0_and_cfg1_skip_branches():
    bw = branch_weights(1.0, 0.0, 1.0)
    assert bw.needed() == {"text_face": False, "uncond": False, "text": False, "face": True}
    assert bw.needed(skip_uncond_at_cfg1=False)["uncond"]
    f = torch.randn(3)
    assert three_way_cfg(bw, None, None, f, None) is f


def test_missing_needed_branch_and_non_finite_weights_raise():
    df, d, _, u = _preds(3)
    with pytest.raises(ValueError, match="branch 'face'"):
        three_way_cfg(branch_weights(7.5, 0.5, 0.5), df, d, None, u)
    with pytest.raises(ValueError, match="unconditional"):
        three_way_cfg(branch_weights(7.5, 1.0, 0.0), df, None, None, None)
    with pytest.raises(ValueError, match="c must be a finite"):
        branch_weights(7.5, float("nan"), 0.0)


def test_inputs_unchanged():
    preds = _preds(4)
    copies = [p.clone() for p in preds]
    three_way_cfg(branch_weights(7.5, 0.4, 0.5), preds[0], preds[1], preds[2], preds[3])
    for p, q in zip(preds, copies):
        assert torch.equal(p, q)


def test_cfg_function_gets_the_combined_conditional_and_the_uncond():
    """The guider hands its host's CFG step in: it gets ε̃ and ε(∅); unpatched, it is the default formula."""
    df, d, f, u = _preds(4)
    bw = branch_weights(6.0, 0.4, 0.3)
    seen = []

    def cfg_function(cond, uncond):  # ComfyUI's cfg_function arithmetic without patches
        seen.append((cond, uncond))
        return uncond + (cond - uncond) * bw.cfg

    out = three_way_cfg(bw, df, d, f, u, cfg_function=cfg_function)
    torch.testing.assert_close(seen[0][0], 0.4 * df + 0.6 * (0.3 * f + 0.7 * d), rtol=1e-12, atol=1e-12)
    assert seen[0][1] is u and torch.equal(out, three_way_cfg(bw, df, d, f, u))
