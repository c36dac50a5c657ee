"""Skin retouching (py/facechain/retouch.py): strength 0 is the identity, nothing outside the mask moves,
skin texture inside it is smoothed (variance drop measured) while a strong edge survives; on a real face crop."""

import numpy as np
import pytest
from PIL import Image

from facecond.py.facechain import retouch

SKIN = np.array([224, 172, 150], np.float32) / 255  # Cr 152, Cb 110: inside the Chai & Ngan box


def test_skin_colour_box_by_hand():
    img = np.stack([SKIN, np.array([0.2, 0.4, 0.8], np.float32), np.array([0.5, 0.5, 0.5], np.float32)])[None]
    # skin: Y = 0.299*224 + 0.587*172 + 0.114*150 = 184.8; Cr = 0.713*(224-184.8)+128 = 155.9; Cb = 0.564*(150-
    # 184.8)+128 = 108.4 -> in the box. Blue: Cr = 0.713*(51-91.9)+128 = 98.8 -> out. Grey: Cr = Cb = 128 -> out
    assert retouch.skin_colour(img).tolist() == [[1.0, 0.0, 0.0]]


def _textured_skin(size=64, seed=0):
    rng = np.random.default_rng(seed)
    img = np.clip(SKIN + rng.normal(0, 0.02, (size, size, 3)), 0, 1).astype(np.float32)
    img[:, size // 2 + 8:] = (0.1, 0.1, 0.1)  # dark hair on the right: not skin, a strong edge
    region = np.zeros((size, size), np.float32)
    region[8:56, 8:56] = 1.0
    return img, region


def test_strength_zero_is_bit_identical_and_the_input_is_untouched():
    img, region = _textured_skin()
    before = img.copy()
    out, mask = retouch.retouch(img, region, 0.0)
    assert out.tobytes() == img.tobytes() and not mask.any()
    retouch.retouch(img, region, 1.0)
    assert img.tobytes() == before.tobytes()
    with pytest.raises(ValueError, match=r"0\.\.1"):
        retouch.retouch(img, region, 1.5)


def test_outside_the_mask_unchanged_inside_smoother():
    img, region = _textured_skin()
    out, mask = retouch.retouch(img, region, 1.0)
    assert (mask[region == 0] == 0).all() and (mask[:, 43:] == 0).all()  # hair from column 40; feather radius 2
    still = mask == 0
    assert (out[still] == img[still]).all()
    core = mask > 0.99
    assert core.sum() > 400
    var_in, var_out = img[core].var(axis=0).mean(), out[core].var(axis=0).mean()
    assert var_out < 0.5 * var_in, (var_in, var_out)
    half = retouch.retouch(img, region, 0.5)[0]
    assert np.allclose(half[core], 0.5 * (img[core] + out[core]), atol=1e-6)  # linear in strength


def test_real_face_crop(shared_data):
    im = Image.open(shared_data / "faces/johns/John_Salley/000179_02159509.jpg").convert("RGB")
    img = np.asarray(im, np.float32) / 255
    h, w = img.shape[:2]
    yy, xx = np.mgrid[:h, :w]
    region = (((xx - w / 2) / (0.35 * w)) ** 2 + ((yy - h / 2) / (0.45 * h)) ** 2 <= 1).astype(np.float32)
    out, mask = retouch.retouch(img, region, 1.0)
    assert (out[region == 0] == img[region == 0]).all()
    core = mask > 0.9
    assert core.mean() > 0.05, core.mean()  # some of the face is found as skin
    # high-frequency energy (Laplacian) inside the skin drops
    import cv2
    lap_in = np.abs(cv2.Laplacian(img.mean(-1), cv2.CV_32F))[core].mean()
    lap_out = np.abs(cv2.Laplacian(out.mean(-1), cv2.CV_32F))[core].mean()
    assert lap_out < 0.8 * lap_in, (lap_in, lap_out)
