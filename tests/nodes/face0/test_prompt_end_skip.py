"""Face0 where the context is a layer-normalised hidden state one layer before the end: SD1.x with CLIP skip 2
(CLIPSetLastLayer -2) on the tiny SD1.5, and SD2's OpenCLIP-H at its default penultimate layer on the tiny SD2-base and
SD2-v. The prompt's end is found through the last layer with the residual scale as the one unknown
(nodes/face0/prompt_end.py), so short prompts keep the paper's positions; more skip or token weights: an added chunk."""

from __future__ import annotations

import pytest
import torch

import nodes
from facecond.nodes.face0.projection import ProjectToContext
from facecond.nodes.face0.prompt_end import clip_prompt_ends
from facecond.py.face0.projection import ProjectionInfo, face_tokens, override_tokens, random_projection
from facecond.py.faces.types import FaceEmbeds

EOS = 49407
TEXT = "a photo of a person in a garden"


def _embeds():
    x = torch.nn.functional.normalize(torch.randn(1, 128, generator=torch.Generator().manual_seed(0)), dim=-1)
    return FaceEmbeds(embeds=x, model="test/embedder", normalized=True, source_index=(0,))


def _eos(clip, text):
    tokens = clip.tokenize(text)
    return [t[0] for t in next(iter(tokens.values()))[0]].index(EOS)


def _check_paper_positions(clip, enc, empty, width):
    proj = random_projection(ProjectionInfo(embedder="test/embedder", embed_dim=128, context_dim=width,
                                            base_model="sd1" if width == 768 else "sd2"), seed=2)
    with torch.inference_mode():
        pos = ProjectToContext().project(enc, _embeds(), proj, clip, "each", empty_conditioning=empty)[0]
        tok = face_tokens(proj, _embeds().embeds)
    assert torch.equal(pos[0][0], override_tokens(enc[0][0], tok, "each"))  # no added chunk, nothing overwritten


def test_sd15_clip_skip_2_end_found_skip_3_not(tiny_model):
    _, clip, _ = tiny_model
    skip2 = nodes.CLIPSetLastLayer().set_last_layer(clip, -2)[0]
    skip3 = nodes.CLIPSetLastLayer().set_last_layer(clip, -3)[0]
    with torch.inference_mode():
        enc2 = nodes.CLIPTextEncode().encode(skip2, TEXT)[0]
        enc3 = nodes.CLIPTextEncode().encode(skip3, TEXT)[0]
        empty = nodes.CLIPTextEncode().encode(skip2, "")[0]
        assert clip_prompt_ends(skip2, enc2[0][0], enc2[0][1]["pooled_output"]) == _eos(clip, TEXT)
        assert clip_prompt_ends(skip3, enc3[0][0], enc3[0][1]["pooled_output"]) is None  # two layers: not undone
        assert clip_prompt_ends(clip, enc2[0][0], enc2[0][1]["pooled_output"]) is None  # default layer: no match
        weighted = nodes.CLIPTextEncode().encode(skip2, "a (photo:1.4) of a person")[0]
        assert clip_prompt_ends(skip2, weighted[0][0], weighted[0][1]["pooled_output"]) is None
    _check_paper_positions(skip2, enc2, empty, 768)


@pytest.mark.parametrize("family", ["sd2", "sd2v"], indirect=True)
def test_sd2_end_found_at_the_default_layer(family, family_model):
    _, clip, _ = family_model
    with torch.inference_mode():
        enc = nodes.CLIPTextEncode().encode(clip, TEXT)[0]
        empty = nodes.CLIPTextEncode().encode(clip, "")[0]
        long_enc = nodes.CLIPTextEncode().encode(clip, " ".join(["word"] * 74))[0]
        assert clip_prompt_ends(clip, enc[0][0], enc[0][1]["pooled_output"]) == _eos(clip, TEXT)
        assert clip_prompt_ends(clip, long_enc[0][0], long_enc[0][1]["pooled_output"]) == 75
    _check_paper_positions(clip, enc, empty, 1024)
