"""Geometry invariants of py/faces/align.py: exact on synthetic points, no models needed."""

import math

import numpy as np
import pytest

from facecond.py.faces.align import (
    ARCFACE_DST,
    arcface_affine,
    box_of_points,
    eye_angle,
    face0_affine,
    paste_back,
    rot90_points,
    square_mask,
    transform_points,
    umeyama,
    warp_crop,
)


def _similarity(scale, angle, tx, ty):
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[scale * c, -scale * s, tx], [scale * s, scale * c, ty]], np.float64)


def test_umeyama_recovers_a_known_similarity():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 200, (5, 2))
    m = _similarity(1.7, 0.4, 12.0, -30.0)
    dst = src @ m[:, :2].T + m[:, 2]
    np.testing.assert_allclose(umeyama(src, dst), m, atol=1e-4)


def test_arcface_affine_of_the_template_is_identity_and_scales():
    np.testing.assert_allclose(arcface_affine(ARCFACE_DST), np.eye(2, 3), atol=1e-5)
    lm = ARCFACE_DST * 3.0 + np.array([100.0, 50.0])  # the same face, 3x larger, shifted
    m = arcface_affine(lm)
    np.testing.assert_allclose(transform_points(m, lm), ARCFACE_DST, atol=1e-3)


def test_face0_margins_are_the_papers_pixels_at_the_papers_scale():
    # a 140 x 112 box is the scale where the margins are exactly 10/10/33/15 px of the 160 px crop
    x1, y1 = 200.0, 300.0
    m = face0_affine((140.0, 112.0), (x1 + 70.0, y1 + 56.0))
    tl, br = transform_points(m, np.array([[x1, y1], [x1 + 140.0, y1 + 112.0]]))
    np.testing.assert_allclose(tl, [10.0, 33.0], atol=1e-4)
    np.testing.assert_allclose(br, [150.0, 145.0], atol=1e-4)


def test_face0_margins_scale_with_the_face_and_keep_aspect():
    for side in (50.0, 300.0):
        m = face0_affine((side, side), (500.0, 500.0))
        lin = m[:, :2]
        assert abs(lin[0, 0] - lin[1, 1]) < 1e-6 and abs(lin[0, 1]) < 1e-6  # uniform scale: aspect kept
        top = transform_points(m, np.array([[500.0, 500.0 - side / 2]]))[0, 1]
        bottom = transform_points(m, np.array([[500.0, 500.0 + side / 2]]))[0, 1]
        # vertical margins in output pixels do not depend on the face size
        np.testing.assert_allclose([top, 160 - bottom], [33.0, 15.0], atol=1e-3)
    tight = face0_affine((100.0, 100.0), (0.0, 0.0), margin_scale=0.0)
    np.testing.assert_allclose(transform_points(tight, np.array([[-50.0, -50.0]])), [[0.0, 0.0]], atol=1e-4)


def test_face0_crop_of_a_rotated_face_is_upright():
    # a face rolled by 90 degrees: the crop matrix with that angle maps its "up" direction to crop-up
    m = face0_affine((100.0, 100.0), (300.0, 300.0), angle=math.pi / 2)
    up_in_image = np.array([[300.0 + 40.0, 300.0]])  # for a face rolled +90 deg, its top points to +x
    p = transform_points(m, up_in_image)[0]
    assert p[1] < 80 and abs(p[0] - 80) < 1e-3


def test_eye_angle():
    assert eye_angle(np.array([[0, 0], [10, 0], [5, 5], [0, 9], [10, 9]], np.float32)) == 0.0
    assert abs(eye_angle(np.array([[0, 0], [0, 10], [0, 0], [0, 0], [0, 0]], np.float32)) - math.pi / 2) < 1e-6


@pytest.mark.parametrize("k", [1, 2, 3])
def test_rot90_points_map_back_to_the_source_pixels(k):
    h, w = 7, 11
    img = np.arange(h * w, dtype=np.float32).reshape(h, w)
    rot = np.rot90(img, k)
    for i, j in [(0, 0), (2, 5), (rot.shape[0] - 1, rot.shape[1] - 1)]:
        centre = np.array([[j + 0.5, i + 0.5]], np.float32)  # pixel centre, continuous coordinates
        x, y = rot90_points(centre, k, h, w)[0] - 0.5
        assert img[round(float(y)), round(float(x))] == rot[i, j]


def test_box_of_points():
    np.testing.assert_allclose(box_of_points(np.array([[3, 4], [1, 9], [5, 2]], np.float32)), [1, 2, 5, 9])


def test_warp_crop_shrinks_without_aliasing_and_paste_back_restores():
    rng = np.random.default_rng(1)
    # a fine checkerboard: plain bilinear sampling at 1/8 scale aliases, area averaging gives ~0.5 grey
    yy, xx = np.mgrid[:1280, :1280]
    board = (((yy // 2) + (xx // 2)) % 2).astype(np.float32)[..., None].repeat(3, -1)
    m = np.array([[0.125, 0, 0], [0, 0.125, 0]], np.float32)
    crop = warp_crop(board, m, 160)
    assert crop.shape == (160, 160, 3)
    assert abs(float(crop[5:-5, 5:-5].mean()) - 0.5) < 0.02 and float(crop[5:-5, 5:-5].std()) < 0.05

    img = rng.uniform(0, 1, (200, 240, 3)).astype(np.float32)
    m = face0_affine((80.0, 80.0), (120.0, 100.0))  # a 2x upscale crop
    crop = warp_crop(img, m, 160)
    edited = np.clip(crop + 0.25, 0, 1)
    out, alpha = paste_back(img, edited, m, square_mask(160, 0.0))
    inside = transform_points(np.array(cv2_invert(m)), np.array([[80.0, 80.0]]))[0].round().astype(int)
    assert out[inside[1], inside[0]].mean() > img[inside[1], inside[0]].mean() + 0.1
    assert alpha[inside[1], inside[0]] == 1.0 and alpha[0, 0] == 0.0
    assert np.array_equal(out[alpha == 0], img[alpha == 0])  # outside the crop: bit-identical
    assert not np.shares_memory(out, img)


def cv2_invert(m):
    import cv2

    return cv2.invertAffineTransform(np.asarray(m, np.float64))
