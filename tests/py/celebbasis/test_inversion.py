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
    with pytest.raises(ValueError, match="init must be one of"):
        inv.init_vectors("celeb", TABLE, _tok, 2)


@pytest.mark.parametrize("seed", [0, 3, 11])
def test_rand2_is_two_vectors_from_two_distinct_names(seed):
    """Livshits' rand2: two random vectors of the vectorised names. The draw, by hand: randperm of the four
    two-token names with the seed's generator; vector 0 = the first name's first token, vector 1 = the second
    name's second token."""
    vec, what = inv.init_vectors("rand2", TABLE, _tok, 2, names=NAMES, seed=seed)
    two_token = NAMES[:4]  # "Solo" has one token: never drawn
    perm = torch.randperm(4, generator=torch.Generator().manual_seed(seed))
    a, b = two_token[int(perm[0])], two_token[int(perm[1])]
    assert a != b
    assert torch.equal(vec, torch.stack([TABLE[_tok(a)[0]], TABLE[_tok(b)[1]]]))
    assert what == f"rand2: {a}[0], {b}[1]"
    # K = 4: four distinct names, tokens 0, 1, 0, 1
    vec4, what4 = inv.init_vectors("rand2", TABLE, _tok, 4, names=NAMES, seed=seed)
    picked = [two_token[int(i)] for i in perm]
    assert torch.equal(vec4, torch.stack([TABLE[_tok(n)[j % 2]] for j, n in enumerate(picked)]))
    assert len(set(picked)) == 4 and what4 == "rand2: " + ", ".join(f"{n}[{j % 2}]" for j, n in enumerate(picked))
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


def test_photo_centroids_by_hand_and_id_picks_the_closest_by_cosine():
    """Each name's row is the cosine centroid of its photos: normalise the rows, average, normalise again. On
    2-d vectors: Ann's photos (3, 4) and (0, 2) -> (0.6, 0.8) and (0, 1) -> mean (0.3, 0.9) -> /sqrt(0.9);
    Bob's one photo (-1, 0) -> (-1, 0); Cy has no face."""
    faces = inv.celeb_faces_from_photos(["Ann Lee", "Bob Stone", "Cy Young"],
                                        [torch.tensor([[3.0, 4.0], [0.0, 2.0]]), torch.tensor([[-1.0, 0.0]]), None],
                                        "test/emb", source="x")
    r = 0.9 ** 0.5
    assert torch.allclose(faces.embeds[0], torch.tensor([0.3 / r, 0.9 / r]), atol=1e-6)
    assert torch.equal(faces.embeds[1], torch.tensor([-1.0, 0.0])) and bool(faces.embeds[2].isnan().all())
    assert faces.found.tolist() == [True, True, False] and faces.embedder == "test/emb"
    # person (1, 2): cos with Ann = (0.3 + 1.8) / (sqrt(5) * sqrt(0.9)) = 0.9899; with Bob = -1/sqrt(5) = -0.447
    assert faces.closest(torch.tensor([1.0, 2.0]), faces.names) == 0
    # person (-1, 0.1): Bob (cos 0.995) beats Ann ((-0.3 + 0.09) / ... < 0)
    assert faces.closest(torch.tensor([-1.0, 0.1]), faces.names) == 1
    vec, what = inv.init_vectors("id", TABLE, _tok, 2, names=list(faces.names), celeb_faces=faces,
                                 face=torch.tensor([-1.0, 0.1]))
    assert what == "id: Bob Stone" and torch.equal(vec, TABLE[_tok("Bob Stone")])
    with pytest.raises(ValueError, match="no face in any name's photos"):
        inv.celeb_faces_from_photos(["Ann Lee"], [None], "test/emb")
    with pytest.raises(ValueError, match="different widths"):
        inv.celeb_faces_from_photos(["A B", "C D"], [torch.ones(1, 2), torch.ones(1, 3)], "test/emb")


def test_filter_drops_names_the_model_does_not_draw_as_them():
    """filter_by_generated keeps a name only when cos(generated portrait, photo centroid) >= threshold. By hand:
    Ann's centroid (1, 0) vs her portrait (0.8, 0.6): 0.8; Bob's (0, 1) vs (1, 0): 0.0; Cy's (0.6, 0.8) vs a
    portrait without a face: dropped; Dee is not in the generated set: dropped."""
    photos = inv.celeb_faces_from_photos(["Ann Lee", "Bob Stone", "Cy Young", "Dee Moss"],
                                         [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]),
                                          torch.tensor([[0.6, 0.8]]), torch.tensor([[1.0, 1.0]])], "test/emb")
    gen = inv.CelebFaces(torch.tensor([[2.0, 0.0], [0.8, 0.6], [float("nan")] * 2]),
                         torch.tensor([True, True, False]), ("Bob Stone", "Ann Lee", "Cy Young"), "m1", "test/emb", {})
    kept, dropped = inv.filter_by_generated(photos, gen, 0.5)
    assert kept.found.tolist() == [True, False, False, False] and dropped == ["Bob Stone", "Cy Young", "Dee Moss"]
    assert torch.equal(kept.embeds, photos.embeds) and photos.found.all()  # the input is not changed
    kept0, dropped0 = inv.filter_by_generated(photos, gen, 0.0)  # Bob's cosine 0.0 passes a threshold of 0
    assert kept0.found.tolist() == [True, True, False, False] and dropped0 == ["Cy Young", "Dee Moss"]
    kept_hi, _ = inv.filter_by_generated(photos, gen, 0.81)  # 0.8 < 0.81: Ann goes too
    assert not kept_hi.found.any()
    # id never picks a dropped name: a face equal to Bob's photos still lands on Ann
    assert kept.closest(torch.tensor([0.0, 1.0]), kept.names) == 0
    with pytest.raises(ValueError, match="same face recogniser"):
        inv.filter_by_generated(photos, inv.CelebFaces(torch.ones(1, 3), torch.tensor([True]), ("Ann Lee",), "m",
                                                       "other", {}), 0.5)


def test_fingerprint_and_file_name():
    a = inv.fingerprint([TABLE])
    assert a == inv.fingerprint([TABLE.clone()]) and a != inv.fingerprint([TABLE + 1e-3])
    name = inv.faces_file_name(a, "insightface/testpack/mobilefacenet_128.onnx@e72a5710")
    assert name.startswith(f"celeb_faces_{a}_insightface-testpack-mobilefacenet") and name.endswith(".safetensors")
    assert name != inv.faces_file_name(a, "insightface/testpack/mobilefacenet_128.onnx@00000000")


def test_square_images_takes_the_centred_square_and_resizes():
    from facecond.py.celebbasis.train import square_images

    tall = torch.rand(1, 24, 16, 4, generator=torch.Generator().manual_seed(0))  # RGBA, H=24, W=16
    out = square_images(tall, 16)
    assert torch.equal(out, tall[:, 4:20, :, :3])  # rows 4..19: the centred 16 x 16, alpha dropped, no resize
    half = square_images(tall, 8)
    assert half.shape == (1, 8, 8, 3) and 0 <= float(half.min()) and float(half.max()) <= 1
    flat = torch.full((1, 24, 16, 3), 0.25)  # a flat image stays flat at any size (weights sum to 1)
    assert torch.allclose(square_images(flat, 64), torch.full((1, 64, 64, 3), 0.25), atol=1e-6)
    assert not tall.is_inference() and tall.shape == (1, 24, 16, 4)  # the input is untouched
    with pytest.raises(ValueError, match="multiple of 8"):
        square_images(tall, 12)


def test_two_tables_inits_and_log_norm_per_table():
    """SDXL: the init takes the same tokens' rows from both tables; the log-norm has one n per table."""
    g_table = torch.randn(50, 5, generator=torch.Generator().manual_seed(3)) * 7.0
    face, _ = inv.init_vectors("face", [TABLE, g_table], _tok, 3)
    ref, _ = inv.init_vectors("face", TABLE, _tok, 3)
    ids = torch.tensor(_tok(inv.FACE_PHRASE))[torch.arange(3) % 2]
    assert face.shape == (3, D + 5) and torch.equal(face[:, :D], ref) and torch.equal(face[:, D:], g_table[ids])
    r2, w2 = inv.init_vectors("rand2", [TABLE, g_table], _tok, 2, names=NAMES, seed=3)
    assert torch.equal(r2[:, :D], inv.init_vectors("rand2", TABLE, _tok, 2, names=NAMES, seed=3)[0]) and "[0]" in w2
    tv = inv.TIVectors(face, "log_norm_e", dims=(D, 5))
    assert tv.params["n"].shape == (3, 2) and torch.allclose(tv.vectors(), face, atol=1e-5)
    assert torch.allclose(tv.params["n"].exp(), torch.stack([face[:, :D].norm(dim=-1), face[:, D:].norm(dim=-1)], -1))
    with torch.no_grad():
        tv.params["n"][:, 1] += 1.0  # the CLIP-G part's norm grows by e; the CLIP-L part is unchanged
    v = tv.vectors()
    assert torch.allclose(v[:, :D], face[:, :D], atol=1e-5)
    assert torch.allclose(v[:, D:].norm(dim=-1), face[:, D:].norm(dim=-1) * torch.e, rtol=1e-5)
    tensors, meta = inv.embedding_file(v, ("clip_l", "clip_g"), {"family": "SDXL"}, (D, 5))
    assert {k: tuple(t.shape) for k, t in tensors.items()} == {"clip_l": (3, D), "clip_g": (3, 5)}
    assert meta["facecond.kind"] == "face_ti" and meta["family"] == "SDXL"
    with pytest.raises(ValueError, match="not the encoders'"):
        inv.TIVectors(face, "log_norm_e", dims=(D, 4))
