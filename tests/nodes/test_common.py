"""nodes/common.py: the checks, widget specs, progress and IMAGE conversions every node uses, on real ComfyUI
objects (ProgressBar and its global hook, KSampler's own INPUT_TYPES) and real tensors."""

from __future__ import annotations

import logging

import comfy.utils
import numpy as np
import pytest
import torch

import nodes
from facecond.nodes.common import (
    FACE_EMBEDS,
    Progress,
    image_to_numpy,
    numpy_to_image,
    require_embeds,
    require_faces,
    sampler_inputs,
    seed_input,
)
from facecond.py.faces.types import FaceEmbeds


def _fe(n=2, d=128, model="test/a"):
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(n * d)), dim=-1)
    return FaceEmbeds(x, model, True, tuple(range(n)))


def test_require_embeds_returns_the_rows_as_float32():
    fe = _fe(3)
    x = require_embeds("N", "face_embeds", fe, dim=128, embedder="test/a")
    assert x.dtype == torch.float32 and torch.equal(x, fe.embeds)
    assert torch.equal(require_embeds("N", "e", fe, dim=128, embedder="any"), fe.embeds)  # "any": every embedder
    empty = FaceEmbeds(torch.zeros(0, 128), "test/a", True, ())
    assert require_embeds("N", "e", empty, dim=512, allow_empty=True).shape == (0, 128)


def test_require_embeds_wrong_type_names_node_input_and_fix():
    with pytest.raises(ValueError, match=rf"^MyNode: input 'face_embeds' must be a {FACE_EMBEDS} .*got Tensor\. "
                                         "Connect a FaceEmbed output to it\\.$"):
        require_embeds("MyNode", "face_embeds", torch.zeros(1, 128))
    with pytest.raises(ValueError, match="got NoneType"):
        require_embeds("MyNode", "face_embeds", None)
    with pytest.raises(ValueError, match=r"^MyNode: input 'b' is empty \(0 embeddings\)\. Check that FaceDetectCrop"):
        require_embeds("MyNode", "b", FaceEmbeds(torch.zeros(0, 8), "m", False, ()))


def test_require_embeds_wrong_width_says_found_expected_and_fix():
    with pytest.raises(ValueError, match=r"^MyNode: input 'face_embeds' holds 64-d embeddings from 'test/a' but this "
                                         r"node takes 128-d embeddings\. Use a FaceEmbed model that gives 128-d "
                                         r"embeddings\.$"):
        require_embeds("MyNode", "face_embeds", _fe(d=64), dim=128)
    with pytest.raises(ValueError, match=r"holds 64-d embeddings from 'test/a' but the projection takes 128-d "
                                         r"embeddings from 'test/b'\. Embed the faces with 'test/b' \(FaceEmbed's "
                                         r"model\); or load another projection$"):
        require_embeds("P", "face_embeds", _fe(d=64), dim=128, embedder="test/b", against="the projection takes",
                       fix="or load another projection")


def test_require_embeds_wrong_embedder_and_nan_rows():
    with pytest.raises(ValueError, match=r"^P: input 'e' holds 128-d embeddings from 'test/a' but the MLP takes "
                                         r"128-d embeddings from 'test/b'\. Embed the faces with 'test/b'"):
        require_embeds("P", "e", _fe(), dim=128, embedder="test/b", against="the MLP takes")
    x = _fe(3).embeds.clone()
    x[2, 5] = float("inf")
    bad = FaceEmbeds(x, "test/a", True, (0, 1, 2))
    with pytest.raises(ValueError, match=r"^P: input 'e' rows \[2\] contain NaN or inf\. Re-run FaceEmbed"):
        require_embeds("P", "e", bad)
    assert torch.equal(require_embeds("P", "e", bad, finite=False), x)


def test_require_faces_names_node_input_and_source():
    with pytest.raises(ValueError, match=r"^FaceEmbed: input 'faces' must be FACES from FaceDetectCrop \(got "
                                         r"FaceEmbeds\)\. Connect FaceDetectCrop's faces output to it\.$"):
        require_faces("FaceEmbed", "faces", _fe())


def test_seed_and_sampler_widgets_are_ksamplers():
    ks = nodes.KSampler.INPUT_TYPES()["required"]
    assert seed_input("t") == ("INT", {**ks["seed"][1], "tooltip": "t"})
    assert seed_input("t", control_after_generate=False)[1] == {"default": 0, "min": 0, "max": 2**64 - 1,
                                                                 "tooltip": "t"}
    spec = sampler_inputs()
    assert list(spec) == ["sampler_name", "scheduler"]
    assert spec["sampler_name"][0] == ks["sampler_name"][0] and spec["scheduler"][0] == ks["scheduler"][0]


@pytest.fixture
def bar_hook():
    calls = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: calls.append((value, total)))
    yield calls
    comfy.utils.set_progress_bar_global_hook(None)


def _sent_first_last_in_order(sent: list[tuple[int, int]], total: int) -> None:
    """What reached ComfyUI's progress hook: every step on 0.3.75; on current ComfyUI the bar throttles what it
    sends (the first and the last update always go out), so: first, last, and increasing in between."""
    assert sent[0] == (1, total) and sent[-1] == (total, total), sent
    assert all(t == total for _, t in sent) and [v for v, _ in sent] == sorted({v for v, _ in sent}), sent


def test_progress_drives_a_real_progress_bar_and_logs_steps(bar_hook, caplog):
    p = Progress(25, label="TrainX")
    assert isinstance(p.bar, comfy.utils.ProgressBar) and p.bar.total == 25
    currents = []
    with caplog.at_level(logging.INFO, logger="facecond"):
        for step in range(1, 26):
            p(step, 25, 1.0 / step)  # py/train/core.Trainer.run's progress(done, total, loss)
            currents.append(p.bar.current)
    assert currents == list(range(1, 26))
    _sent_first_last_in_order(bar_hook, 25)
    lines = [r.getMessage() for r in caplog.records if r.name == "facecond"]
    assert lines == ["[facecond] TrainX step 1/25 loss 1.00000", "[facecond] TrainX step 10/25 loss 0.10000",
                     "[facecond] TrainX step 20/25 loss 0.05000", "[facecond] TrainX step 25/25 loss 0.04000"]


def test_progress_counts_without_logging(bar_hook, caplog):
    p = Progress(3)
    currents = []
    with caplog.at_level(logging.INFO, logger="facecond"):
        for i in range(1, 4):
            p(i)
            currents.append(p.bar.current)
    assert currents == [1, 2, 3] and not caplog.records
    _sent_first_last_in_order(bar_hook, 3)
    Progress(0)(1)  # nothing to do still makes a valid bar (total 1)
    assert bar_hook[-1] == (1, 1)


def test_image_numpy_round_trips_exactly():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 5, 7, 3, generator=g)  # ComfyUI IMAGE (B, H, W, C)
    a = image_to_numpy(image, "N")
    assert a.dtype == np.float32 and a.shape == (2, 5, 7, 3) and a.flags.c_contiguous
    back = numpy_to_image(a)
    assert back.dtype == torch.float32 and torch.equal(back, image)
    mask = np.random.default_rng(1).random((2, 5, 7), dtype=np.float32)  # MASK (B, H, W)
    assert np.array_equal(numpy_to_image(mask).numpy(), mask)
    assert np.array_equal(image_to_numpy(numpy_to_image(a), "N"), a)
    assert np.array_equal(image_to_numpy(image[0], "N"), a[:1])  # (H, W, C): a batch of one


def test_image_to_numpy_handles_grey_alpha_and_range():
    g = torch.Generator().manual_seed(2)
    rgb = torch.rand(1, 4, 4, 3, generator=g)
    rgba = torch.cat([rgb, torch.zeros(1, 4, 4, 1)], dim=-1)
    assert np.array_equal(image_to_numpy(rgba, "N"), rgb.numpy())
    grey = torch.rand(1, 4, 4, 1, generator=g)
    assert np.array_equal(image_to_numpy(grey, "N"), grey.expand(1, 4, 4, 3).numpy())
    bytes_ = torch.arange(48, dtype=torch.float32).reshape(1, 4, 4, 3) * 5.0  # 0..235: 8-bit values
    assert np.array_equal(image_to_numpy(bytes_, "N"), (bytes_ / 255.0).numpy())
    nan = rgb.clone()
    nan[0, 1, 1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^N: input 'pic' has NaN or infinite pixels in image\(s\) \[0\] of 1"):
        image_to_numpy(nan, "N", "pic")
    with pytest.raises(ValueError, match="input 'pic' has 5 channels"):
        image_to_numpy(torch.zeros(1, 2, 2, 5), "N", "pic")
