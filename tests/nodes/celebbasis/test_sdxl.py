"""Celeb Basis and face TI on the tiny SDXL checkpoint (full-size CLIP-L + CLIP-G, real tokenizer): a word trained
on it and a face-TI embedding trained on it give, through the pack, the conditioning (CLIP-L half, CLIP-G half and
the pooled output) core ComfyUI gives for the saved file as ``embedding:NAME``; the CLIP and the model are
untouched; coefficients and MLPs record the family and another family refuses them with the reason.
Cheap by design: 64 px, 1 training step, a 32-component basis, four SDXL encodes in all (CLIP-G is full size)."""

from __future__ import annotations

import os
import shutil

import folder_paths
import pytest
import torch
from safetensors import safe_open

import nodes
from facecond.nodes.celebbasis.basis import CelebBasisCoeffs, TrainCelebBasis, basis_for
from facecond.nodes.celebbasis.files import LoadCelebCoeffs, SaveCelebCoeffs
from facecond.nodes.celebbasis.inversion import TrainFaceTI, celeb_faces_path
from facecond.nodes.celebbasis.pseudo_words import _word_dir, text_encoder
from facecond.nodes.celebbasis.training import encode_with, template_tokens
from facecond.py.celebbasis import basis as cb
from facecond.py.celebbasis.coeffs import BasisFacts, CelebCoeffs, load_mlp
from facecond.py.faces.types import FaceEmbeds

pytestmark = pytest.mark.parametrize("family", ["sdxl"], indirect=True)

P, D = 32, 16


def _encode(clip, text):
    with torch.inference_mode():
        cond = nodes.CLIPTextEncode().encode(clip, text)[0][0]
    return cond[0], cond[1]["pooled_output"]


def _snapshot(model, clip):
    enc = text_encoder(clip, "t")
    return ([t[:2000].clone() for t in enc.tables()],
            {k: v.clone() for k, v in list(model.model.diffusion_model.state_dict().items())[:6]})


def _untouched(model, clip, snap):
    tables, unet = snap
    assert all(torch.equal(t[:2000], s) for t, s in zip(text_encoder(clip, "t").tables(), tables, strict=True))
    assert all(torch.equal(model.model.diffusion_model.state_dict()[k], v) for k, v in unet.items())
    assert all(p.grad is None for p in model.model.parameters())
    assert all(p.grad is None for p in clip.cond_stage_model.parameters())
    assert not hasattr(clip.tokenizer, "words")  # the input CLIP's tokenizer is the original one


@pytest.fixture(scope="module")
def photos():
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(2, D, generator=g), dim=-1)
    return torch.rand(2, 64, 64, 3, generator=g), FaceEmbeds(x, "test/embedder", True, (0, 1))


def test_text_encoders_of_sdxl(family_model):
    enc = text_encoder(family_model[1], "t")
    assert enc.keys == ("clip_l", "clip_g") and enc.dims == (768, 1280) and enc.family == "SDXL"
    # one BPE vocabulary: the name tokens index both tables alike
    assert enc.parts[0].tokenize("Tom Hanks") == enc.parts[1].tokenize("Tom Hanks")


def test_celeb_basis_word_trained_on_sdxl_equals_embedding_file(family_model, tiny_model, photos):
    model, clip, vae = family_model
    images, fe = photos
    snap = _snapshot(model, clip)
    mlp, name, report = TrainCelebBasis().train(model, clip, vae, images, fe, "", "a photo of {}", 1, 0.01, P, 0,
                                                False, "nodes_test_sdxl/mlp", False, resolution=64, overwrite=True)
    assert "1 steps, 1 identities, 2 images at 64 px" in report and "p=32" in report
    _untouched(model, clip, snap)
    root = folder_paths.get_folder_paths("facecond_celebbasis")[0]
    loaded, info = load_mlp(os.path.join(root, name))
    assert info["facts"].family == "SDXL" and torch.equal(loaded.fc.weight, mlp.mlp.fc.weight)
    basis = basis_for(clip, cb.load_names(), P, "t")[0]
    assert basis.basis.shape == (2, P, 2048) and basis.dims == (768, 1280)

    alice, coeffs = CelebBasisCoeffs().apply(clip, "<alice>", "none", face_embeds=fe, celeb_mlp=mlp)
    assert coeffs.facts.family == "SDXL"
    g = torch.Generator().manual_seed(1)
    bob = CelebCoeffs((torch.nn.functional.normalize(torch.randn(2, P, generator=g), dim=-1)
                       * basis.scale.view(2, 1)).half().float(), coeffs.facts)
    both = CelebBasisCoeffs().apply(alice, "<bob>", "none", coefficients=bob)[0]
    _untouched(model, clip, snap)
    # the word is in both sub-tokenizers, at the same positions, as the two halves of C̄_k + B_k α_k
    text = "a photo of <alice> shaking hands with <bob>"
    toks = both.tokenize(text)
    vec = basis.embeddings(coeffs.coeffs)
    for key, part in (("l", vec[:, :768]), ("g", vec[:, 768:])):
        emb = [(i, t) for i, (t, _) in enumerate(toks[key][0]) if torch.is_tensor(t)]
        assert [i for i, _ in emb] == [4, 5, 9, 10], key
        assert torch.equal(emb[0][1], part[0]) and torch.equal(emb[1][1], part[1])

    # the pack's pseudo-word files are standard SDXL embeddings: core ComfyUI loads them as embedding:NAME
    emb_dir = folder_paths.get_folder_paths("embeddings")[0]
    os.makedirs(emb_dir, exist_ok=True)
    for word, label in (("<alice>", "sdxl_cb_alice"), ("<bob>", "sdxl_cb_bob")):
        src = os.path.join(_word_dir(), both.tokenizer._names[word] + ".safetensors")
        with safe_open(src, framework="pt") as f:
            assert {k: tuple(f.get_tensor(k).shape) for k in f.keys()} == {"clip_l": (2, 768), "clip_g": (2, 1280)}
        shutil.copy(src, os.path.join(emb_dir, label + ".safetensors"))
    mine, mine_pooled = _encode(both, text)
    core, core_pooled = _encode(clip, "a photo of embedding:sdxl_cb_alice shaking hands with embedding:sdxl_cb_bob")
    assert mine.shape == (1, 77, 2048) and mine_pooled.shape == (1, 1280)
    assert torch.equal(mine[..., :768], core[..., :768]) and torch.equal(mine[..., 768:], core[..., 768:])
    assert torch.equal(mine_pooled, core_pooled)
    _untouched(model, clip, snap)

    # saved coefficients keep the family; an SD1.5 CLIP refuses them and the MLP, with the reason
    saved = SaveCelebCoeffs().save(coeffs, "nodes_test_sdxl/alice")[0]
    back = LoadCelebCoeffs().load(saved)[0]
    assert back.facts.family == "SDXL" and torch.equal(back.coeffs, coeffs.coeffs)
    sd15 = tiny_model[1]
    with pytest.raises(ValueError, match=r"CelebBasisCoeffs: coefficients was made for an SDXL model but this CLIP "
                       r"is SD1.x.*CLIP-L 768 \+ CLIP-G 1280.*Load an SDXL checkpoint"):
        CelebBasisCoeffs().apply(sd15, "<alice>", "none", coefficients=back)
    with pytest.raises(ValueError, match=r"the coefficient MLP was made for an SDXL model but this CLIP is SD1.x"):
        CelebBasisCoeffs().apply(sd15, "<alice>", "none", face_embeds=fe, celeb_mlp=mlp)
    old = CelebCoeffs(back.coeffs, BasisFacts(P, back.facts.table_hash, back.facts.names_hash))  # no family
    with pytest.raises(ValueError, match=r"made for an SD1.x/SD2.x model but this CLIP is SDXL"):
        CelebBasisCoeffs().apply(clip, "<carol>", "none", coefficients=old)


def test_face_ti_trained_on_sdxl_is_a_standard_sdxl_embedding(family_model, photos):
    model, clip, vae = family_model
    images, _ = photos
    snap = _snapshot(model, clip)
    out_clip, name, report = TrainFaceTI().train(model, clip, vae, images, "face", 2, "log_norm_e", "a photo of {}", 1,
                                                 0.005, 0, False, "nodes_test_sdxl_ti", resolution=64, overwrite=True)
    assert name == "nodes_test_sdxl_ti" and "1 steps, 2 images, K=2, init face" in report
    _untouched(model, clip, snap)
    assert out_clip is not clip
    path = os.path.join(folder_paths.get_folder_paths("embeddings")[0], name + ".safetensors")
    with safe_open(path, framework="pt") as f:
        meta, parts = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    assert {k: tuple(v.shape) for k, v in parts.items()} == {"clip_l": (2, 768), "clip_g": (2, 1280)}
    assert meta["family"] == "SDXL" and meta["facecond.kind"] == "face_ti"
    # both halves moved from the 'human face' init; each kept its own table's norm (log-norm per table)
    enc = text_encoder(clip, "t")
    ids = torch.tensor(enc.tokenize("human face"))
    for (key, v), table in zip(parts.items(), enc.tables(), strict=True):
        init = table[ids].float()
        assert not torch.equal(v, init), key
        assert torch.allclose(v.norm(dim=-1), init.norm(dim=-1), rtol=0.05), key
    # core ComfyUI's embedding:NAME == the trainer's text forward with the file's vectors (halves and pooled)
    core, core_pooled = _encode(clip, f"a photo of embedding:{name}")
    vectors = torch.cat([parts["clip_l"], parts["clip_g"]], dim=-1)
    ctx, pooled = encode_with(clip, template_tokens(clip, ["a photo of {}"], "t")[0], vectors, "t")
    assert torch.allclose(ctx[..., :768], core[..., :768], atol=1e-5, rtol=0)
    assert torch.allclose(ctx[..., 768:], core[..., 768:], atol=1e-5, rtol=0)
    assert torch.allclose(pooled, core_pooled, atol=1e-5, rtol=0)
    # the celebrity-face cache (init='id') is keyed by both token tables
    assert os.path.basename(celeb_faces_path(model, clip, "x", "t")).startswith("celeb_faces_")
    _untouched(model, clip, snap)


def test_precompute_celeb_faces_on_sdxl(family_model, tiny_model, stand_in_models):
    """PrecomputeCelebFaces on SDXL: the real loop samples each name with the SDXL model (CLIPTextEncode's pooled
    output into y, ComfyUI's sampler) and detects on the decoded image; the tiny random model draws no faces, so it
    ends in the clear error naming SDXL's native size. Its cache is keyed by both token tables (not SD1.5's key) and
    a cache written for the same names and settings is returned without sampling again."""
    from facecond.nodes.celebbasis.inversion import (
        FACE_PROMPT,
        PrecomputeCelebFaces,
        model_hash,
        precompute_celeb_faces,
    )
    from facecond.py.celebbasis import inversion as inv
    from facecond_dev import host

    model, clip, vae = family_model
    snap = _snapshot(model, clip)
    node, names = PrecomputeCelebFaces(), ["Ada Lovelace", "Alan Turing"]
    with torch.inference_mode(), pytest.raises(ValueError, match=r"PrecomputeCelebFaces: no face was detected in any "
                                               r"of the 1 generated images.*native size \(1024 px: size 0\)"):
        precompute_celeb_faces(model, clip, vae, names[:1], "mtcnn", host.STAND_IN_RECOGNISER, steps=1, size=64,
                               node="PrecomputeCelebFaces")  # the node's loop, one name (the node wants >= 2)
    _untouched(model, clip, snap)
    key = model_hash(model, clip, "t")
    assert key != model_hash(tiny_model[0], tiny_model[1], "t")
    g = torch.Generator().manual_seed(2)
    cache = inv.CelebFaces(torch.nn.functional.normalize(torch.randn(2, 128, generator=g), dim=-1),
                           torch.tensor([True, False]), tuple(names), key, "test/recogniser",
                           {"prompt": FACE_PROMPT, "steps": 1, "size": 1024, "seed": 0, "detector": "mtcnn",
                            "embedder_choice": host.STAND_IN_RECOGNISER})
    path = celeb_faces_path(model, clip, "test/recogniser", "t")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    inv.save_celeb_faces(cache, path)
    try:  # size 0 = SDXL's 1024: the cache written for 1024 px is reused (sampling at 1024 would take minutes here)
        report, faces = node.precompute(model, clip, vae, "mtcnn", host.STAND_IN_RECOGNISER, 1, 0, 0,
                                        names_text="\n".join(names))
    finally:
        os.remove(path)
    assert report == f"PrecomputeCelebFaces: 1 of 2 names gave a face; {os.path.basename(path)}"
    assert faces.names == tuple(names) and torch.equal(faces.embeds[0], cache.embeds[0])
