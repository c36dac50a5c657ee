"""Face0's embedding nodes in-process (nodes/face0/embeddings.py): EmbeddingInterpolate's modes, RandomIdentity,
Save/LoadFaceEmbeds."""

from __future__ import annotations

import folder_paths
import pytest
import torch

from facecond.nodes.face0.embeddings import EmbeddingInterpolate, LoadFaceEmbeds, RandomIdentity, SaveFaceEmbeds
from facecond.py.faces.types import FaceEmbeds


def _embeds(n, seed=0, model="test/embedder", d=128):
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)
    return FaceEmbeds(embeds=x, model=model, normalized=True, source_index=tuple(range(n)))


def test_embedding_interpolate_modes():
    a, b = _embeds(1, seed=1), _embeds(1, seed=2)
    node = EmbeddingInterpolate()
    (lerped,) = node.interpolate(a, "lerp", 0.0, 1.0, 5, "", 1.0, 0.0, 0, face_embeds_b=b)
    assert len(lerped) == 5 and lerped.model == a.model and lerped.normalized
    torch.testing.assert_close(lerped.embeds[0], a.embeds[0])
    torch.testing.assert_close(lerped.embeds[4], b.embeds[0])
    torch.testing.assert_close(lerped.embeds.norm(dim=-1), torch.ones(5))
    (slerped,) = node.interpolate(a, "slerp", -0.5, 1.5, 3, "", 1.0, 0.0, 0, face_embeds_b=b)
    assert len(slerped) == 3 and slerped.source_index == (-1, -1, -1)
    (mean,) = node.interpolate(_embeds(3), "weighted_mean", 0, 1, 1, "1, 1, 2", 1.0, 0.0, 0)
    assert len(mean) == 1
    (edit,) = node.interpolate(a, "direction", 0, 1, 1, "", 0.5, 0.0, 0, direction_from=a, direction_to=b)
    expected = torch.nn.functional.normalize(a.embeds + 0.5 * (b.embeds - a.embeds), dim=-1)
    torch.testing.assert_close(edit.embeds, expected)
    n1 = node.interpolate(a, "noise_only", 0, 1, 1, "", 1.0, 0.01, 7)[0]
    n2 = node.interpolate(a, "noise_only", 0, 1, 1, "", 1.0, 0.01, 7)[0]
    assert torch.equal(n1.embeds, n2.embeds) and not torch.equal(n1.embeds, a.embeds)
    with pytest.raises(ValueError, match="needs the face_embeds_b input"):
        node.interpolate(a, "lerp", 0, 1, 5, "", 1.0, 0.0, 0)
    with pytest.raises(ValueError, match="cannot be mixed"):
        node.interpolate(a, "lerp", 0, 1, 5, "", 1.0, 0.0, 0, face_embeds_b=_embeds(1, model="x"))


def test_random_identity_is_seeded_and_keeps_embedder():
    pool = _embeds(12, seed=3)
    node = RandomIdentity()
    (r1,), (r2,), (r3,) = (node.sample(pool, s, 4, 2, 1.0) for s in (42, 42, 43))
    assert torch.equal(r1.embeds, r2.embeds) and not torch.equal(r1.embeds, r3.embeds)
    assert len(r1) == 4 and r1.model == pool.model and r1.normalized and r1.source_index == (-1,) * 4
    torch.testing.assert_close(r1.embeds.norm(dim=-1), torch.ones(4))
    with pytest.raises(ValueError, match="needs at least 2"):
        node.sample(_embeds(1), 0, 1, 1, 1.0)


def test_save_and_load_face_embeds_nodes():
    fe = _embeds(2, seed=8)
    name = SaveFaceEmbeds().save(fe, "tests/identity", "embeds_folder", "unit test")["result"][0]
    assert name in LoadFaceEmbeds.INPUT_TYPES()["required"]["embeds_name"][0]
    (back,) = LoadFaceEmbeds().load(name)
    assert torch.equal(back.embeds, fe.embeds) and back.model == fe.model and back.normalized
    second = SaveFaceEmbeds().save(fe, "tests/identity", "embeds_folder", "")["result"][0]
    assert second != name  # counter, never overwrites
    out_name = SaveFaceEmbeds().save(fe, "identity", "output", "")["result"][0]
    assert (folder_paths.get_output_directory() + "/" + out_name)
