"""The template face in pixels for face fusion (py/facechain/fusion.py): geometry, colour matching and blending,
with hand-computed values."""

import numpy as np
import pytest

from facecond.py.facechain import fusion
from facecond.py.faces.align import ARCFACE_DST, arcface_affine, transform_points, warp_crop


def test_template_region_puts_its_landmarks_where_the_generated_face_has_them():
    # two faces at different places and sizes: through their own region matrices both land on one spot
    lm_a = ARCFACE_DST * 1.2 + np.array([60.0, 60.0])
    lm_b = ARCFACE_DST * 0.7 + np.array([5.0, 60.0])
    ma = fusion.region_affine(arcface_affine(lm_a), 1.6, 96)
    mb = fusion.region_affine(arcface_affine(lm_b), 1.6, 96)
    assert np.allclose(transform_points(ma, lm_a), transform_points(mb, lm_b), atol=1e-3)
    # pixels: a photo with a bright dot on the template's nose tip shows it at the nose of the working crop
    photo = np.zeros((300, 300, 3), np.float32)
    nx, ny = np.round(lm_a[2]).astype(int)
    photo[ny - 2:ny + 3, nx - 2:nx + 3] = 1.0
    pix, valid = fusion.template_region(photo, arcface_affine(lm_a), 1.6, 96)
    nose = transform_points(mb, lm_b)[2]
    assert pix.shape == (96, 96, 3) and valid.shape == (96, 96)
    assert pix[int(nose[1]), int(nose[0])].min() > 0.5 and float(pix.sum()) < 40 * 3
    assert valid.min() == 1.0  # the region lies inside the 300 px photo


def test_template_region_validity_is_zero_off_the_photo():
    lm = ARCFACE_DST * 0.5  # a small face in the top-left corner: the context region leaves the photo
    photo = np.full((100, 100, 3), 0.5, np.float32)
    pix, valid = fusion.template_region(photo, arcface_affine(lm), 2.0, 64)
    assert valid[0, 0] == 0.0 and valid[40, 40] == 1.0
    assert np.allclose(pix[valid == 1.0], 0.5) and np.all(pix[valid == 0.0] == 0.0)


def test_template_from_aligned_crop_is_the_112_region_zoomed():
    crop = np.zeros((112, 112, 3), np.float32)
    crop[:, :56] = 1.0  # left half white
    pix, valid = fusion.template_from_aligned(crop, 2.0, 112)  # context 2 at 112 px: the 112 region is 56 px
    # the 112 crop sits in the middle 56 px: x, y in [28, 84)
    assert valid[56, 56] == 1.0 and valid[10, 10] == 0.0 and valid[56, 20] == 0.0
    assert pix[56, 40].min() > 0.99 and pix[56, 70].max() < 0.01 and pix[10, 10].max() == 0.0
    # context 1: the aligned crop itself (a 112 -> 112 identity warp)
    same, v1 = fusion.template_from_aligned(crop, 1.0, 112)
    assert np.allclose(same, crop, atol=1e-6) and v1.min() == 1.0


def test_match_colour_moves_mean_and_std_inside_the_weight():
    rng = np.random.default_rng(0)
    src = rng.uniform(0.2, 0.4, (32, 32, 3)).astype(np.float32)
    tgt = rng.uniform(0.5, 0.9, (32, 32, 3)).astype(np.float32)
    w = np.zeros((32, 32), np.float32)
    w[8:24, 8:24] = 1.0
    out = fusion.match_colour(src, tgt, w)
    sel = w > 0
    for c in range(3):
        assert abs(out[sel][:, c].mean() - tgt[sel][:, c].mean()) < 1e-4
        assert abs(out[sel][:, c].std() - tgt[sel][:, c].std()) < 1e-4
    # by hand on one pixel: (x - mu_s) * sd_t / sd_s + mu_t
    mu_s, sd_s = src[sel].mean(0), src[sel].std(0)
    mu_t, sd_t = tgt[sel].mean(0), tgt[sel].std(0)
    assert np.allclose(out[3, 3], (src[3, 3] - mu_s) * sd_t / sd_s + mu_t, atol=1e-5)
    assert np.array_equal(fusion.match_colour(src, tgt, np.zeros_like(w)), src)  # no weight: unchanged


def test_blend_template_is_a_per_pixel_mix():
    crop = np.full((4, 4, 3), 0.2, np.float32)
    tmpl = np.full((4, 4, 3), 1.0, np.float32)
    w = np.array([[0.0, 0.25, 0.5, 1.0]] * 4, np.float32)
    out = fusion.blend_template(crop, tmpl, w)
    assert np.allclose(out[0, :, 0], [0.2, 0.4, 0.6, 1.0], atol=1e-6)  # 0.2 (1 - w) + 1.0 w
    assert np.array_equal(out[:, 0], crop[:, 0])  # weight 0: bit-identical
    assert out.dtype == np.float32 and np.array_equal(crop, np.full((4, 4, 3), 0.2, np.float32))


@pytest.mark.parametrize("context", [1.0, 1.6])
def test_aligned_and_photo_templates_agree_inside_the_112_region(shared_data, context):
    from PIL import Image

    photo = np.asarray(Image.open(shared_data / "faces/obama/obama.jpg").convert("RGB").resize((455, 569)),
                       np.float32) / 255.0
    lm = ARCFACE_DST * 2.2 + np.array([120.0, 150.0])  # where a face would be: any similarity will do
    a = arcface_affine(lm)
    crop112 = warp_crop(photo, a, 112)
    p1, v1 = fusion.template_region(photo, a, context, 112)
    p2, v2 = fusion.template_from_aligned(crop112, context, 112)
    inner = (v2 == 1.0) & (v1 == 1.0)
    assert inner.sum() > 0.3 * inner.size / context ** 2
    assert float(np.abs(p1[inner] - p2[inner]).mean()) < 0.02  # same pixels, one resampling apart
