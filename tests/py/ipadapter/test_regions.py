"""Where the IP-Adapter mask lands (py/ipadapter/regions.py): a mask over the whole image cut to the area of an area
conditioning, per batch chunk, against hand-written masks and a hand-computed attention; mask batch and aspect checks.

ComfyUI runs an area conditioning on the latent cropped to its area (comfy/samplers.py ``get_area_and_mult``) and
batches chunks of equal shape, so one call can hold a left-area chunk, a right-area chunk and their uncond copies.
"""

import logging

import pytest
import torch

from facecond.py.ipadapter import adapter as ipa
from facecond.py.ipadapter import regions
from facecond_dev import reference

C, HEADS = 8, 2


def hand_attention(q, k, v, heads=HEADS):
    return reference.hand_attention(q, k, v, heads)


def make_term(weight, mask, tokens=3, seed=2):
    g = torch.Generator().manual_seed(seed)
    k, v, kn, vn = (torch.randn(1, tokens, C, generator=g) for _ in range(4))
    return ipa.IPTerm(k, v, kn, vn, weight, 10.0, 1.0, mask)


def area_opts(uuids, cond_or_uncond, areas, hw=(4, 3), sigma=5.0):
    return {"n_heads": HEADS, "sigmas": torch.tensor([sigma]), "cond_or_uncond": list(cond_or_uncond),
            "uuids": list(uuids), regions.AREAS_KEY: areas, "activations_shape": [len(uuids), C, *hw],
            "original_shape": [len(uuids), 4, *hw]}


def image_mask():
    """An image-sized mask (32 x 48 px = a 4 x 6 latent, 8 px per cell): 1 on latent rows 0-1, columns 2-4."""
    m = torch.zeros(1, 32, 48)
    m[:, 0:16, 16:40] = 1
    return m


# The same mask, cut by hand to the 4 x 3 left area (latent columns 0-2) and right area (columns 3-5), row-major.
LEFT = [0, 0, 1,
        0, 0, 1,
        0, 0, 0,
        0, 0, 0]
RIGHT = [1, 1, 0,
         1, 1, 0,
         0, 0, 0,
         0, 0, 0]


def test_mask_is_cut_to_each_chunks_area_in_one_batch():
    """Chunks: left area (cond), right area (cond), left area (uncond copy: ComfyUI copies the positive's dict, so
    the same uuid). The image term applies exactly where the mask is 1 inside each chunk's area."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, n, C) for n in (12, 5, 5))
    term = make_term(0.7, image_mask())
    areas = {"left": (0, 0, 4, 6), "right": (0, 3, 4, 6)}
    out = ipa.IPAttentionPatch((term,))(q, k, v, area_opts(["left", "right", "left"], (0, 0, 1), areas))
    ks, vs = [term.k, term.k, term.k_neg], [term.v, term.v, term.v_neg]
    expect = hand_attention(q, k, v)
    for i, (kk, vv, cut) in enumerate(zip(ks, vs, [LEFT, RIGHT, LEFT])):
        gate = torch.tensor(cut, dtype=torch.float64)[None, :, None]
        expect[i:i + 1] += 0.7 * hand_attention(q[i:i + 1], kk, vv) * gate
    torch.testing.assert_close(out.double(), expect, atol=1e-6, rtol=1e-6)
    base = ipa.sdpa(q, k, v, HEADS)
    assert torch.equal(out[0, [0, 1, 3, 4, 6, 7, 8, 9, 10, 11]], base[0, [0, 1, 3, 4, 6, 7, 8, 9, 10, 11]])


def test_area_windows_at_a_coarser_layer_and_chunks_without_area():
    """At a layer of half the resolution (2 x 2 grid of a 4 x 3 area: ceil), and a chunk whose uuid has no area
    (the whole latent) beside an area chunk of the same shape (an area as big as the latent)."""
    mask = image_mask()
    windows = regions.chunk_windows({"original_shape": [2, 4, 4, 3], "uuids": ["a", "b"],
                                     regions.AREAS_KEY: {"a": (0, 3, 4, 6)}}, 2)
    assert windows == ((0, 3, 4, 3, 4, 6), (0, 0, 4, 3, 4, 3))
    got = regions.window_mask(mask, windows[:1], (2, 2), rows=1).flatten()
    # the right area's 32 x 24 px of the mask, bilinear to 2 x 2 (align_corners=False, one resize of the crop)
    crop = mask[:, None, :, 24:48]
    want = torch.nn.functional.interpolate(crop, size=(2, 2), mode="bilinear", align_corners=False).flatten()
    torch.testing.assert_close(got, want)
    assert got.tolist() == [1.0, 0.0, 0.0, 0.0]  # samples at crop px (7.5, 5.5), (7.5, 17.5), (23.5, ..): top-left


def test_without_areas_the_mask_covers_the_whole_latent_as_before():
    q, k, v = (torch.randn(2, n, C) for n in (24, 5, 5))
    term = make_term(1.0, image_mask())
    opts = {"n_heads": HEADS, "sigmas": torch.tensor([5.0]), "cond_or_uncond": [0, 1],
            "activations_shape": [2, C, 4, 6], "original_shape": [2, 4, 4, 6]}
    out = ipa.IPAttentionPatch((term,))(q, k, v, opts)
    gate = torch.zeros(4, 6, dtype=torch.float64)
    gate[0:2, 2:5] = 1
    gate = gate.flatten()[None, :, None]
    expect = hand_attention(q, k, v)
    expect[:1] += hand_attention(q[:1], term.k, term.v) * gate
    expect[1:] += hand_attention(q[1:], term.k_neg, term.v_neg) * gate
    torch.testing.assert_close(out.double(), expect, atol=1e-6, rtol=1e-6)


def test_one_mask_per_latent_image_and_wrong_mask_batch_refused():
    left = torch.zeros(2, 32, 48)
    left[0, :, :24] = 1  # image 0: left half; image 1: right half
    left[1, :, 24:] = 1
    windows = ((0, 0, 4, 6, 4, 6),) * 2  # cond and uncond chunks, 2 images each
    got = regions.window_mask(left, windows, (4, 6), rows=2)[..., 0].reshape(4, 4, 6)
    assert got[[0, 2], :, :3].eq(1).all() and got[[0, 2], :, 3:].eq(0).all()
    assert got[[1, 3], :, 3:].eq(1).all() and got[[1, 3], :, :3].eq(0).all()
    with pytest.raises(ValueError, match=r"ApplyIPAdapter: attn_mask holds 3 masks but the latent batch is 2: give "
                                         r"one mask .* or 2 \(one per image\)"):
        regions.window_mask(torch.ones(3, 32, 48), windows, (4, 6), rows=2)


def test_aspect_mismatch_is_stretched_with_one_warning(caplog):
    """Decision: a mask of another aspect is stretched (fractions kept: a left-half mask stays the left half) and a
    warning names the sizes once, when the far edge moves by more than ASPECT_TOLERANCE_CELLS latent cells."""
    square = torch.zeros(1, 32, 32)
    square[:, :, :16] = 1  # left half
    window = ((0, 0, 4, 6, 4, 6),)
    with caplog.at_level(logging.WARNING, logger="facecond"):
        got = regions.window_mask(square, window, (4, 6), rows=1)[0, :, 0].reshape(4, 6)
        regions.window_mask(square, window, (4, 6), rows=1)
    assert got[:, :3].eq(1).all() and got[:, 3:].eq(0).all()
    warned = [r.getMessage() for r in caplog.records if "aspect differs" in r.getMessage()]
    assert len(warned) == 1 and "attn_mask is 32x32 (w x h) but the latent is 6x4 (48x32 px)" in warned[0]
    assert "moves by 2.0 latent cells" in warned[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="facecond"):
        regions.window_mask(torch.ones(1, 33, 47), window, (4, 6), rows=1)  # within one cell: quiet
    assert not [r for r in caplog.records if "aspect differs" in r.getMessage()]


def test_cond_areas_reads_resolved_areas_by_uuid():
    conds = [[{"uuid": "a", "area": (8, 3, 0, 5)}, {"uuid": "b"}], None,
             [{"uuid": "c", "area": ("percentage", 0.5, 0.5, 0, 0)}]]
    assert regions.cond_areas(conds, (8, 8)) == {"a": (0, 5, 8, 8)}
