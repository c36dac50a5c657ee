"""Face0's ProjectToContext with long prompts on the tiny SD1.5 checkpoint and ComfyUI's real CLIPTextEncode: the face
never overwrites a prompt token or the EOS, and short prompts keep the paper's positions bit for bit (issue 21)."""

from __future__ import annotations

import logging

import pytest
import torch

import nodes
from facecond.nodes.face0.guidance import ThreeWayCFGSampler
from facecond.nodes.face0.projection import ProjectToContext
from facecond.py.face0.projection import face_tokens, override_tokens
from facecond.py.faces.types import FaceEmbeds


def _embeds(n, seed=0, model="test/embedder", d=128):
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)
    return FaceEmbeds(embeds=x, model=model, normalized=True, source_index=tuple(range(n)))


# ComfyUI's SD1 tokenizer (comfy/sd1_clip.py, SDTokenizer.tokenize_with_weights) fills a 77-token chunk with BOS,
# up to 75 prompt tokens, EOS, and pads with EOS; each chunk is encoded on its own and the chunks concatenated.

BOS, EOS = 49406, 49407


def _prompt(n):
    """A prompt of exactly n CLIP tokens (each "word" is one token) ending in "intricate details"."""
    return " ".join(["word"] * (n - 2) + ["intricate", "details"])


def _token_chunks(clip, text):
    return [[t[0] for t in chunk] for chunk in clip.tokenize(text)["l"]]


def _prompt_and_eos_rows(clip, text):
    """Rows of the concatenated context holding a prompt token or a chunk's (first) EOS, and the prompt length."""
    rows, n = [], 0
    for c, ids in enumerate(_token_chunks(clip, text)):
        eos = ids.index(EOS)
        assert ids[0] == BOS and EOS not in ids[1:eos]
        rows += [77 * c + p for p in range(1, eos + 1)]
        n += eos - 1
    return rows, n


def _face_chunk(empty, tok):
    """What an added chunk must be: the empty prompt's encoding with the face at its tokens 75-77."""
    chunk = empty[0][0][:, :77].clone()
    chunk[:, 74:] = tok.to(chunk.dtype)
    return chunk


@pytest.mark.parametrize("mode", ["each", "first", "last"])
@pytest.mark.parametrize("n", [73, 74, 75, 89, 150])
def test_long_prompt_keeps_every_prompt_token_and_eos(tiny_model, projection, caplog, n, mode):
    _, clip, _ = tiny_model
    text = _prompt(n)
    rows, counted = _prompt_and_eos_rows(clip, text)
    assert counted == n
    with torch.inference_mode():
        enc = nodes.CLIPTextEncode().encode(clip, text)[0]
        empty = nodes.CLIPTextEncode().encode(clip, "")[0]
        before = enc[0][0].clone()
        with caplog.at_level(logging.WARNING, logger="facecond"):
            pos, text_only, face_only, neg = ProjectToContext().project(enc, _embeds(1), projection, clip, mode)
        tok = projection(_embeds(1).embeds)  # (1, 3, 768)
    ctx = enc[0][0]
    length = ctx.shape[1]
    assert length == 77 * (1 if n <= 75 else 2) and torch.equal(ctx, before)  # input untouched
    out = pos[0][0]
    assert torch.equal(out[:, rows], ctx[:, rows])  # every prompt token and every EOS, exactly
    # the rule: the prompt's chunks stay whole; the face goes into added chunks (empty prompt + face at 75-77),
    # one per chunk the mode names that has no padding left for it (or whose end cannot be located)
    added = length // 77 if mode == "each" else 1
    assert out.shape == (1, length + 77 * added, 768) and torch.equal(out[:, :length], ctx)
    for j in range(added):
        seg = out[:, length + 77 * j:length + 77 * (j + 1)]
        torch.testing.assert_close(seg, _face_chunk(empty, tok))
        assert torch.equal(seg[:, :74], empty[0][0][:, :74])
    # text_only has the same layout with a zero face; face_only / negative are today's (the empty prompt has room)
    t_out = text_only[0][0]
    assert t_out.shape == out.shape and torch.equal(t_out[:, :length], ctx)
    assert torch.equal(t_out[:, length:], torch.cat([_face_chunk(empty, torch.zeros(1, 3, 768))] * added, dim=1))
    assert face_only[0][0].shape == neg[0][0].shape == (1, 77, 768)
    assert torch.equal(neg[0][0], _face_chunk(empty, torch.zeros(1, 3, 768)))
    warnings = [r.getMessage() for r in caplog.records if r.name == "facecond" and r.levelno == logging.WARNING]
    assert any("added" in w and "chunk" in w for w in warnings), warnings


@pytest.mark.parametrize("n", [0, 5, 40, 71, 72])
def test_short_prompt_is_bit_identical_to_the_paper_positions(tiny_model, projection, caplog, n):
    """BOS + up to 72 prompt tokens + EOS fill at most positions 0-73: tokens 75-77 are padding, overridden as
    before (the paper's positions), bit-identical to override_tokens, in every mode; no warning."""
    _, clip, _ = tiny_model
    text = _prompt(n) if n >= 2 else ""
    rows, counted = _prompt_and_eos_rows(clip, text)
    assert counted == n and max(rows) <= 73
    x = _embeds(2, seed=3)
    with torch.inference_mode():
        enc = nodes.CLIPTextEncode().encode(clip, text)[0]
        empty = nodes.CLIPTextEncode().encode(clip, "")[0]
        tok = face_tokens(projection, x.embeds)
        for mode in ("each", "first", "last"):
            with caplog.at_level(logging.WARNING, logger="facecond"):
                outs = ProjectToContext().project(enc, x, projection, clip, mode)
            ctx, e = enc[0][0], empty[0][0]
            zero = torch.zeros(1, 3, 768)  # the zero face keeps the prompt's batch of 1
            for got, want in zip(outs, (override_tokens(ctx.expand(2, -1, -1), tok, mode),
                                        override_tokens(ctx, zero, mode),
                                        override_tokens(e.expand(2, -1, -1), tok, mode),
                                        override_tokens(e, zero, mode))):
                assert torch.equal(got[0][0], want), mode
    assert not [r for r in caplog.records if r.name == "facecond" and r.levelno >= logging.WARNING]


def test_long_prompt_batch_of_faces_and_sampling(tiny_model, projection):
    """N faces x one long prompt: a batch of N, each row with its own face in the added chunks; samples."""
    model, clip, _ = tiny_model
    x = _embeds(3, seed=6)
    with torch.inference_mode():
        enc = nodes.CLIPTextEncode().encode(clip, _prompt(89))[0]
        empty = nodes.CLIPTextEncode().encode(clip, "")[0]
        outs = ProjectToContext().project(enc, x, projection, clip, "each")
        tok = projection(x.embeds)
    pos = outs[0][0][0]
    assert pos.shape == (3, 154 + 2 * 77, 768)
    assert torch.equal(pos[:, :154], enc[0][0].expand(3, -1, -1))
    for i in range(3):
        for j in (0, 1):
            torch.testing.assert_close(pos[i:i + 1, 154 + 77 * j:154 + 77 * (j + 1)], _face_chunk(empty, tok[i:i + 1]))
    with torch.inference_mode():
        out = ThreeWayCFGSampler().sample(model, 5, 3, 7.5, 0.4, 0.5, "euler", "normal", *outs,
                                          nodes.EmptyLatentImage().generate(64, 64, 3)[0])[0]["samples"]
    assert out.shape[0] == 3 and torch.isfinite(out).all() and not torch.equal(out[0], out[1])
