"""Face0 projection (py/face0/projection.py): architecture, file round trip, zero-face convention, token override."""

import pytest
import torch
from safetensors.torch import save_file

from facecond.py.face0.projection import (
    Face0Projection,
    ProjectionInfo,
    face_tokens,
    load_projection,
    override_tokens,
    place_face_tokens,
    prompt_ends,
    random_projection,
    save_projection,
)


def _info(**kw):
    return ProjectionInfo(**{"embedder": "test/embedder", "embed_dim": 128, **kw})


def test_architecture_is_four_layers_width_768_relu_after_hidden():
    proj = Face0Projection(_info())
    linears = [m for m in proj.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(128, 768), (768, 768), (768, 768), (768, 3 * 768)]
    kinds = [type(m).__name__ for m in proj.mlp]
    assert kinds == ["Linear", "ReLU", "Linear", "ReLU", "Linear", "ReLU", "Linear"]  # no ReLU on the output
    assert proj(torch.randn(5, 128)).shape == (5, 3, 768)


@pytest.mark.parametrize(("base", "width"), [("sd1", 768), ("sd2", 1024), ("sdxl", 2048)])
def test_save_load_round_trip_reads_shapes_from_file(tmp_path, base, width):
    info = _info(embed_dim=512, context_dim=width, base_model=base, tokens=4, embed_normalized=True)
    proj = random_projection(info, seed=3)
    path = tmp_path / f"p_{base}.safetensors"
    save_projection(proj, path)
    loaded = load_projection(path)
    assert loaded.info == info
    x = torch.randn(2, 512)
    assert torch.equal(loaded(x), proj(x))
    assert loaded(x).shape == (2, 4, width)


def test_random_projection_is_seeded_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b = random_projection(_info(), seed=7), random_projection(_info(), seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_load_rejects_foreign_and_inconsistent_files(tmp_path):
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"), metadata={"foo": "bar"})
    with pytest.raises(ValueError, match="not a Face0 projection"):
        load_projection(tmp_path / "other.safetensors")
    proj = random_projection(_info())
    meta = proj.info.to_metadata() | {"embed_dim": "64"}  # metadata lies about D
    save_file({k: v.contiguous() for k, v in proj.state_dict().items()}, str(tmp_path / "bad.safetensors"),
              metadata=meta)
    with pytest.raises(ValueError, match="do not match its metadata"):
        load_projection(tmp_path / "bad.safetensors")


def test_zero_embedding_gives_zero_tokens_and_drop_mask():
    proj = random_projection(_info(), seed=1)
    x = torch.randn(3, 128)
    x[1] = 0
    tok = face_tokens(proj, x)
    assert torch.count_nonzero(tok[1]) == 0  # training-time "no face": projected embedding set to zero
    assert torch.count_nonzero(proj(torch.zeros(1, 128))) > 0  # (MLP(0) would not be zero)
    torch.testing.assert_close(tok[[0, 2]], proj(x[[0, 2]]).detach())
    dropped = face_tokens(proj, x, drop=torch.tensor([True, False, False]))
    assert torch.count_nonzero(dropped[0]) == 0 and torch.equal(dropped[2], tok[2])


def test_override_positions_exact_and_input_untouched():
    ctx = torch.randn(2, 154, 8)
    orig = ctx.clone()
    tok = torch.randn(2, 3, 8)
    for mode, chunks in (("each", [0, 1]), ("first", [0]), ("last", [1])):
        out = override_tokens(ctx, tok, mode)
        assert torch.equal(ctx, orig)
        expected = ctx.clone()
        for i in chunks:
            expected[:, 77 * i + 74:77 * i + 77] = tok  # tokens 75-77 (1-based) of the chunk
        assert torch.equal(out, expected), mode
    with pytest.raises(ValueError, match="multiple of 77"):
        override_tokens(torch.randn(1, 80, 8), torch.randn(1, 3, 8))
    with pytest.raises(ValueError, match="chunks must be"):
        override_tokens(ctx, tok, "middle")


def test_width_and_depth_are_options_recorded_in_the_file(tmp_path):
    info = _info(hidden=64, depth=3)
    proj = random_projection(info, seed=2)
    linears = [m for m in proj.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(128, 64), (64, 64), (64, 2304)]
    assert [type(m).__name__ for m in proj.mlp] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    # (128+1)·64 + (64+1)·64 + (64+1)·2304 = 8,256 + 4,160 + 149,760
    assert info.parameters == sum(p.numel() for p in proj.parameters()) == 162_176
    assert info.to_metadata()["depth"] == "3" and info.to_metadata()["hidden"] == "64"
    save_projection(proj, tmp_path / "p.safetensors")
    loaded = load_projection(tmp_path / "p.safetensors")
    assert loaded.info == info
    x = torch.randn(2, 128)
    assert torch.equal(loaded(x), proj(x))


def test_file_without_depth_key_loads_as_four_layers(tmp_path):
    # files written before `depth` was recorded: same tensors, metadata without the key
    proj = random_projection(_info(), seed=4)
    meta = {k: v for k, v in proj.info.to_metadata().items() if k != "depth"}
    save_file({k: v.contiguous() for k, v in proj.state_dict().items()}, str(tmp_path / "old.safetensors"),
              metadata=meta)
    loaded = load_projection(tmp_path / "old.safetensors")
    assert loaded.info.depth == 4 and loaded.info == proj.info
    x = torch.randn(3, 128)
    assert torch.equal(loaded(x), proj(x))
    # a file whose metadata claims another depth than its tensors is refused
    save_file({k: v.contiguous() for k, v in proj.state_dict().items()}, str(tmp_path / "lies.safetensors"),
              metadata=meta | {"depth": "5"})
    with pytest.raises(ValueError, match=r"do not match its metadata .*depth=5"):
        load_projection(tmp_path / "lies.safetensors")


def test_bad_shape_options_are_refused():
    with pytest.raises(ValueError, match=r"depth=0"):
        _info(depth=0)
    with pytest.raises(ValueError, match=">= 1"):
        _info(hidden=0)
    one = random_projection(_info(depth=1))  # depth 1: a single Linear D -> K·W
    assert [type(m).__name__ for m in one.mlp] == ["Linear"] and one.info.parameters == 129 * 2304


def _chunked(n_chunks, width=8, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 77 * n_chunks, width, generator=g), torch.randn(1, 77, width, generator=g)


def test_prompt_ends_from_the_pooled_output_row():
    ctx, _ = _chunked(2)
    pooled = ctx[:, 9].clone()  # SD1.x at the final layer: the pooled output is the context row of the first EOS
    assert prompt_ends(ctx, pooled) == [9, None]  # later chunks: no pooled output, unknown
    rows = ctx.clone()
    rows[1, 30] = pooled[0]
    assert prompt_ends(rows, pooled[:1]) == [30, None]  # one pooled row for the batch: the latest end of any row
    assert prompt_ends(ctx, torch.randn(2, 8)) == [None, None]  # no row matches (CLIP skip, SD2, SDXL)
    assert prompt_ends(ctx, torch.randn(2, 5)) == [None, None]  # another width (SDXL's 1280-d pooled output)
    assert prompt_ends(ctx, None) == [None, None]
    assert prompt_ends(ctx, ctx[:, 0]) == [None, None]  # position 0 is BOS, never an end
    other = ctx.clone()
    other[1, 9] += 1  # the second row's prompt ends elsewhere (not found): unknown
    assert prompt_ends(other, pooled) == [None, None]


def test_place_keeps_paper_positions_when_the_chunk_has_padding():
    ctx, empty = _chunked(3)
    orig = ctx.clone()
    tok = torch.randn(2, 3, 8)
    for mode in ("each", "first", "last"):
        out, added = place_face_tokens(ctx, tok, mode, [73, 10, 40], empty)
        assert added == 0 and torch.equal(out, override_tokens(ctx, tok, mode)) and torch.equal(ctx, orig)


def test_place_adds_a_chunk_where_the_prompt_fills_the_chunk_or_its_end_is_unknown():
    ctx, empty = _chunked(3)
    orig, empty_orig = ctx.clone(), empty.clone()
    tok = torch.randn(2, 3, 8)
    face_chunk = empty.expand(2, -1, -1).clone()
    face_chunk[:, 74:] = tok
    ends = [74, 20, None]  # chunk 0 full (EOS at 74), chunk 1 room, chunk 2 unknown
    out, added = place_face_tokens(ctx, tok, "each", ends, empty)
    assert added == 2 and out.shape == (2, 77 * 5, 8)
    expected = ctx.clone()
    expected[:, 77 + 74:77 * 2] = tok
    assert torch.equal(out, torch.cat([expected, face_chunk, face_chunk], dim=1))
    out, added = place_face_tokens(ctx, tok, "first", ends, empty)
    assert added == 1 and torch.equal(out, torch.cat([ctx, face_chunk], dim=1))
    out, added = place_face_tokens(ctx, tok, "last", ends, empty)
    assert added == 1 and torch.equal(out, torch.cat([ctx, face_chunk], dim=1))
    assert torch.equal(ctx, orig) and torch.equal(empty, empty_orig)
    with pytest.raises(ValueError, match="one end per 77-token chunk"):
        place_face_tokens(ctx, tok, "each", [3], empty)
    with pytest.raises(ValueError, match="empty_chunk"):
        place_face_tokens(ctx, tok, "each", ends, torch.randn(1, 70, 8))
    with pytest.raises(ValueError, match="chunks must be"):
        place_face_tokens(ctx, tok, "middle", ends, empty)
