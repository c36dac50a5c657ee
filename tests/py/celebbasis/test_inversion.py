"""Face textual inversion maths (py/celebbasis/inversion.py): log-norm gradient, initialisations, the celebrity-face
cache."""

from __future__ import annotations

import pytest
import torch

from facecond.py.celebbasis import inversion as inv

D = 8


def _tok(text: str) -> list[int]:  # a toy tokenizer: one id per word (hash into a 50-row table)
    return [sum(map(ord, w)) % 50 for w in text.lower().split()]


TABLE = torch.randn(50, D, generator=torch.Generator().manual_seed(0))
NAMES = ["Ann Lee", "Bob Stone", "Cy Young", "Dee Moss", "Solo"]


@pytest.mark.parametrize("reparam", ["log_norm_2", "log_norm_e"])
def test_log_norm_gradient_matches_formula(reparam):
    init = torch.randn(3, D, generator=torch.Generator().manual_seed(1))
    tv = inv.TIVectors(init, reparam)
    assert torch.allclose(tv.vectors(), init, atol=1e-5)  # starts exactly at the init vectors
    w = torch.randn(3, D, generator=torch.Generator().manual_seed(2))
    v = tv.vectors()
    loss = (w * v).sum() + (v ** 2).sum()
    g_v, = torch.autograd.grad(loss, v, retain_graph=True)
    g_n, g_d = torch.autograd.grad(loss, [tv.params["n"], tv.params["d"]])
    expected = inv.log_norm_grad(g_v, tv.params["d"].detach(), tv.params["n"].detach(), inv.REPARAM[reparam])
    assert torch.allclose(g_n, expected, rtol=1e-5, atol=1e-6)
    # the direction's gradient is orthogonal to d (scaling d does not change v)
    assert torch.allclose((g_d * tv.params["d"]).sum(-1), torch.zeros(3), atol=1e-4)


def test_plain_vectors_and_bad_options():
    init = torch.randn(2, D)
    tv = inv.TIVectors(init, "none")
    assert set(tv.params) == {"v"} and torch.equal(tv.vectors(), init) and tv.params["v"].requires_grad
    init_before = init.clone()
    tv.params["v"].data.add_(1.0)
    assert torch.equal(init, init_before)  # the input is never mutated
    with pytest.raises(ValueError, match="reparam must be one of"):
        inv.TIVectors(init, "log_norm_3")


def test_init_modes():
    face, what = inv.init_vectors("face", TABLE, _tok, 3)
    ids = _tok("human face")
    assert torch.equal(face, TABLE[[ids[0], ids[1], ids[0]]]) and "human face" in what
    r1, w1 = inv.init_vectors("rand2", TABLE, _tok, 2, names=NAMES, seed=3)
    r2, w2 = inv.init_vectors("rand2", TABLE, _tok, 2, names=NAMES, seed=3)
    assert torch.equal(r1, r2) and w1 == w2  # seeded
    name = w1.split(": ", 1)[1]
    assert name in NAMES[:4] and torch.equal(r1, TABLE[_tok(name)[:2]])  # a two-token name's first two tokens
    with pytest.raises(ValueError, match="init must be one of"):
        inv.init_vectors("celeb", TABLE, _tok, 2)


def test_id_init_picks_the_closest_celebrity_and_cache_roundtrip(tmp_path):
    g = torch.Generator().manual_seed(4)
    faces = torch.nn.functional.normalize(torch.randn(4, 16, generator=g), dim=-1)
    embeds = faces.clone()
    embeds[1] = float("nan")  # Bob Stone's image had no face
    cache = inv.CelebFaces(embeds, torch.tensor([True, False, True, True]), tuple(NAMES[:4]), "abc", "test/emb",
                           {"steps": 20})
    path = tmp_path / inv.faces_file_name("abc", "insightface/x.onnx@12")
    inv.save_celeb_faces(cache, path)
    back = inv.load_celeb_faces(path)
    assert back.names == cache.names and back.embedder == "test/emb" and back.extra["steps"] == "20"
    assert torch.equal(back.found, cache.found) and torch.equal(back.embeds.nan_to_num(9), embeds.nan_to_num(9))
    person = faces[2] + 0.05 * torch.randn(16, generator=g)
    vec, what = inv.init_vectors("id", TABLE, _tok, 2, names=NAMES, celeb_faces=back, face=person)
    assert what == "id: Cy Young" and torch.equal(vec, TABLE[_tok("Cy Young")])
    # a face close to the one without a detection is never matched to it
    assert back.closest(faces[1], NAMES[:4]) != 1
    with pytest.raises(ValueError, match="16-d"):
        back.closest(torch.randn(8), NAMES[:4])


def test_fingerprint_and_file_name():
    a = inv.fingerprint([TABLE])
    assert a == inv.fingerprint([TABLE.clone()]) and a != inv.fingerprint([TABLE + 1e-3])
    name = inv.faces_file_name(a, "insightface/testpack/mobilefacenet_128.onnx@e72a5710")
    assert name.startswith(f"celeb_faces_{a}_insightface-testpack-mobilefacenet") and name.endswith(".safetensors")
    assert name != inv.faces_file_name(a, "insightface/testpack/mobilefacenet_128.onnx@00000000")
