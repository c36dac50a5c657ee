"""Face0 on the tiny SDXL checkpoint: the prompt's end found through CLIP-G's own last layers (nodes/face0/prompt_end),
so a short prompt gets the paper's positions (tokens 75-77 of both halves) and a long one keeps every token (issue 21).
Core ComfyUI's CLIPTextEncode (with and without token weights) and CLIPSetLastLayer make the inputs."""

from __future__ import annotations

import logging

import pytest
import torch

import nodes
from facecond.nodes.face0.projection import LoadFace0Projection, ProjectToContext
from facecond.nodes.face0.prompt_end import clip_prompt_ends
from facecond.py.face0.projection import (
    ProjectionInfo,
    face_tokens,
    override_tokens,
    random_projection,
    save_projection,
)
from facecond.py.faces.types import FaceEmbeds

pytestmark = pytest.mark.parametrize("family", ["sdxl"], indirect=True)
EOS = 49407


def _embeds(n=1, seed=0, d=128):
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)
    return FaceEmbeds(embeds=x, model="test/embedder", normalized=True, source_index=tuple(range(n)))


@pytest.fixture(scope="module")
def projection_xl():
    import os

    import folder_paths

    folder = folder_paths.get_folder_paths("facecond_face0")[0]
    os.makedirs(folder, exist_ok=True)
    info = ProjectionInfo(embedder="test/embedder", embed_dim=128, context_dim=2048, base_model="sdxl")
    save_projection(random_projection(info, seed=1), os.path.join(folder, "face0_sdxl_test.safetensors"))
    return LoadFace0Projection().load("face0_sdxl_test.safetensors")[0]


def _eos(clip, text):
    ids = [t[0] for t in clip.tokenize(text)["g"][0]]
    return ids.index(EOS)


SHORT = "a photo of a person in a garden, golden hour, film grain, portrait"
LONG = " ".join(["word"] * 74)
WEIGHTED = "a (photo:1.3) of a person"


@pytest.fixture(scope="module")
def encoded(family_model):
    """Each prompt encoded once by core CLIPTextEncode (a CLIP-G encode costs seconds on a CPU); "skip" is SHORT
    through CLIPSetLastLayer(-3)."""
    _, clip, _ = family_model
    skipped = nodes.CLIPSetLastLayer().set_last_layer(clip, -3)[0]
    with torch.inference_mode():
        out = {t: nodes.CLIPTextEncode().encode(clip, t)[0] for t in ("", SHORT, LONG, WEIGHTED)}
        out["skip"] = nodes.CLIPTextEncode().encode(skipped, SHORT)[0]
    return clip, skipped, out


def _project(clip, enc, empty, projection):
    return ProjectToContext().project(enc, _embeds(), projection, clip, "each", empty_conditioning=empty)


def test_sdxl_short_prompt_end_found_and_paper_positions(encoded, projection_xl, caplog):
    clip, _, enc = encoded
    ctx, pooled = enc[SHORT][0][0], enc[SHORT][0][1]["pooled_output"]
    assert ctx.shape == (1, 77, 2048)
    with torch.inference_mode():
        assert clip_prompt_ends(clip, ctx, pooled) == _eos(clip, SHORT)
        before = ctx.clone()
        with caplog.at_level(logging.WARNING, logger="facecond"):
            pos, text_only, _, _ = _project(clip, enc[SHORT], enc[""], projection_xl)
        tok = face_tokens(projection_xl, _embeds().embeds)
    assert torch.equal(ctx, before)
    assert torch.equal(pos[0][0], override_tokens(ctx, tok, "each"))  # both halves' tokens 75-77, nothing added
    assert torch.equal(text_only[0][0], override_tokens(ctx, torch.zeros(1, 3, 2048), "each"))
    assert torch.equal(pos[0][1]["pooled_output"], pooled)
    assert not [r for r in caplog.records if r.name == "facecond" and r.levelno >= logging.WARNING]


def test_sdxl_long_prompt_and_changed_context_get_an_added_chunk(encoded, projection_xl):
    """74 tokens leave no padding at 75-77: the chunk stays whole and the face goes to an added chunk. Token weights
    change the context after encoding, so the end is not recomputed: also an added chunk, never an overwrite."""
    clip, _, enc = encoded
    with torch.inference_mode():
        for text, end in ((LONG, 75), (WEIGHTED, None)):
            ctx = enc[text][0][0]
            assert clip_prompt_ends(clip, ctx, enc[text][0][1]["pooled_output"]) == end, text
            out = _project(clip, enc[text], enc[""], projection_xl)[0][0][0]
            assert out.shape == (1, 154, 2048) and torch.equal(out[:, :77], ctx), text


def test_sdxl_clip_skip_end_found(encoded):
    """CLIPSetLastLayer(-3): the context is CLIP-G's layer -3 (still raw); two more layers are run to find the end,
    and only with the CLIP that made it (the default layer gives no match)."""
    clip, skipped, enc = encoded
    ctx, pooled = enc["skip"][0][0], enc["skip"][0][1]["pooled_output"]
    assert not torch.equal(ctx, enc[SHORT][0][0])
    with torch.inference_mode():
        assert clip_prompt_ends(skipped, ctx, pooled) == _eos(clip, SHORT)
        assert clip_prompt_ends(clip, ctx, pooled) is None
