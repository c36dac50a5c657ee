"""Bounds on node inputs (README "Limits"): absurd IMAGE shapes refused before any copy is made."""

from __future__ import annotations

import time

import pytest
import torch

from facecond.nodes.common import MAX_IMAGE_PIXELS, image_to_numpy


def test_absurd_images_are_refused_before_they_are_copied():
    pixel = torch.zeros(1, 1, 1, 3)
    for shape in ((4096, 16384, 16384, 3), (1, 1, 100_000, 3), (0, 64, 64, 3), (1, 0, 64, 3)):
        t = time.perf_counter()
        with pytest.raises(ValueError, match=r"FaceDetectCrop: input 'image' is .*Resize the images"):
            image_to_numpy(pixel.expand(*shape) if min(shape) else torch.zeros(shape), "FaceDetectCrop")
        assert time.perf_counter() - t < 0.5
    assert MAX_IMAGE_PIXELS == 1 << 28
    assert image_to_numpy(torch.rand(2, 8, 8, 3), "X").shape == (2, 8, 8, 3)
