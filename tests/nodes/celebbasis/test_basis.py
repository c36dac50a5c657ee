"""Celeb Basis nodes in-process on the tiny SD1.5 checkpoint (real CLIP-L tokenizer and token table):
pseudo-words in a cloned CLIP, saved coefficients reproducing the conditioning bit for bit, clear errors,
and the trainer end to end (only the MLP moves, the loss falls on a fixed batch, resume)."""

from __future__ import annotations

import os

import folder_paths
import pytest
import torch

import nodes
from facecond.nodes.celebbasis.basis import CelebBasisCoeffs, TrainCelebBasis, basis_for
from facecond.nodes.celebbasis.files import LoadCelebCoeffs, SaveCelebCoeffs
from facecond.nodes.celebbasis.pseudo_words import text_encoder
from facecond.nodes.celebbasis.training import encode_with, template_tokens
from facecond.py.celebbasis import basis as cb
from facecond.py.celebbasis.coeffs import BasisFacts, CelebCoeffs, load_mlp
from facecond.py.faces.types import FaceEmbeds
from facecond.py.train.core import denoising_loss, sample_noise, sample_sigmas, step_generator

D = 16
P = 32


def _embeds(n, seed=0):
    x = torch.nn.functional.normalize(torch.randn(n, D, generator=torch.Generator().manual_seed(seed)), dim=-1)
    return FaceEmbeds(x, "test/embedder", True, tuple(range(n)))


def _encode(clip, text):
    with torch.inference_mode():
        return nodes.CLIPTextEncode().encode(clip, text)[0][0][0]


@pytest.fixture(scope="module")
def basis(tiny_model):
    return basis_for(tiny_model[1], cb.load_names(), P, "test")[0]


def _coeffs(basis, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.nn.functional.normalize(torch.randn(2, P, generator=g), dim=-1) * basis.scale.view(2, 1)
    return CelebCoeffs(a.half().float(), BasisFacts(basis.p, basis.table_hash, basis.names_hash))


def test_pseudo_word_only_at_its_positions(tiny_model, basis):
    clip = tiny_model[1]
    plain = _encode(clip, "a photo of a man riding a horse")
    ca = CelebBasisCoeffs().apply(clip, "<alice>", "none", coefficients=_coeffs(basis, 1))[0]
    both = CelebBasisCoeffs().apply(ca, "<bob>", "none", coefficients=_coeffs(basis, 2))[0]
    assert clip.tokenizer is not ca.tokenizer and not hasattr(clip.tokenizer, "words")  # input untouched
    assert torch.equal(_encode(clip, "a photo of a man riding a horse"), plain)
    assert torch.equal(_encode(both, "a photo of a man riding a horse"), plain)  # no word: same conditioning
    a = _encode(both, "a photo of <alice> riding a horse")
    b = _encode(both, "a photo of <bob> riding a horse")
    # the token inputs differ only at the word's 2 positions (1 + 3 words in: positions 4, 5) ...
    toks = both.tokenize("a photo of <alice> riding a horse")["l"][0]
    assert [i for i, (t, _) in enumerate(toks) if torch.is_tensor(t)] == [4, 5]
    # ... and the causal text encoder leaves everything before them bit-identical
    assert torch.equal(a[:, :4], b[:, :4]) and not torch.allclose(a[:, 4:6], b[:, 4:6])
    # the word's vectors are C̄_k + B_k α_k
    vec = basis.embeddings(_coeffs(basis, 1).coeffs)
    assert torch.equal(toks[4][0], vec[0]) and torch.equal(toks[5][0], vec[1])
    # two people in one prompt, mixed with weights
    two = _encode(both, "(<alice>:1.1) shaking hands with <bob>, oil painting")
    assert two.shape == plain.shape and torch.isfinite(two).all()


def test_saved_coefficients_reproduce_conditioning(tiny_model, basis, tmp_path):
    clip = tiny_model[1]
    from facecond.py.celebbasis.coeffs import new_mlp, save_mlp

    root = folder_paths.get_folder_paths("facecond_celebbasis")[0]
    os.makedirs(root, exist_ok=True)
    save_mlp(new_mlp(D, basis, 0), os.path.join(root, "nodes_test_mlp.safetensors"), basis,
             embedder="test/embedder", names=cb.load_names(), steps=0)
    out_clip, coeffs = CelebBasisCoeffs().apply(clip, "<carol>", "nodes_test_mlp.safetensors", face_embeds=_embeds(2))
    assert coeffs.coeffs.shape == (2, P)
    name = SaveCelebCoeffs().save(coeffs, "nodes_test/person")[0]
    assert os.path.getsize(os.path.join(root, name)) < 2 * 2 * P + 1024
    loaded = LoadCelebCoeffs().load(name)[0]
    again = CelebBasisCoeffs().apply(clip, "<carol>", "none", coefficients=loaded)[0]
    text = "a portrait of <carol> as an astronaut"
    assert torch.equal(_encode(out_clip, text), _encode(again, text))


def test_bad_inputs(tiny_model, basis):
    clip, node = tiny_model[1], CelebBasisCoeffs()
    c = _coeffs(basis, 0)
    with pytest.raises(ValueError, match=r"CelebBasisCoeffs: pseudo_word 'alice smith' is not a pseudo-word.*<alice>"):
        node.apply(clip, "alice smith", "none", coefficients=c)
    with pytest.raises(ValueError, match="collides with the real token 'alice'"):
        node.apply(clip, "alice", "none", coefficients=c)
    ca = node.apply(clip, "<alice>", "none", coefficients=c)[0]
    with pytest.raises(ValueError, match="already used"):
        node.apply(ca, "<alice>", "none", coefficients=c)
    # coefficients carry their p; one this name list cannot give (p <= names - 1) is another basis
    big = CelebCoeffs(torch.zeros(2, 700), BasisFacts(700, basis.table_hash, basis.names_hash))
    with pytest.raises(ValueError, match="700-component coefficients but the basis of this CLIP has p=627"):
        node.apply(clip, "<x>", "none", coefficients=big)
    with pytest.raises(ValueError, match=r"celebrity-name list .* Put the list it was trained with there"):
        node.apply(clip, "<x>", "none", coefficients=CelebCoeffs(c.coeffs, BasisFacts(P, basis.table_hash, "f" * 16)))
    other = CelebCoeffs(c.coeffs, BasisFacts(P, "0" * 16, basis.names_hash))
    with pytest.raises(ValueError, match="another model"):
        node.apply(clip, "<x>", "none", coefficients=other)
    with pytest.raises(ValueError, match="nothing to make the word from"):
        node.apply(clip, "<x>", "none")


def test_text_encoder_rejects_t5_clips(tiny_model):
    from comfy import sd
    from comfy.text_encoders import sd3_clip

    fake = sd.CLIP.__new__(sd.CLIP)
    fake.cond_stage_model = sd3_clip.SD3ClipModel.__new__(sd3_clip.SD3ClipModel)
    fake.tokenizer = tiny_model[1].tokenizer
    with pytest.raises(ValueError, match=r"CelebBasisCoeffs: this CLIP \(SD3ClipModel\) is neither one CLIP text "
                       r"encoder \(SD1.x, SD2.x\) nor SDXL's CLIP-L \+ CLIP-G.*T5"):
        text_encoder(fake, "CelebBasisCoeffs")


@pytest.fixture(scope="module")
def train_inputs(tiny_model):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 64, 64, 3, generator=g)
    return images, _embeds(3, seed=5)


def test_trainer_end_to_end(tiny_model, train_inputs, basis):
    model, clip, vae = tiny_model
    images, fe = train_inputs
    unet_before = {k: v.clone() for k, v in list(model.model.diffusion_model.state_dict().items())[:6]}
    table_before = text_encoder(clip, "t").table().clone()
    mlp, name, report = TrainCelebBasis().train(model, clip, vae, images, fe, "a,a,b", "a photo of {}", 1, 0.01,
                                                P, 0, True, "nodes_test/train", False, resolution=64)
    assert "1 steps, 2 identities" in report and name == os.path.join("nodes_test", "train.safetensors")
    for k, v in unet_before.items():
        assert torch.equal(model.model.diffusion_model.state_dict()[k], v)
    assert torch.equal(text_encoder(clip, "t").table(), table_before)
    assert all(p.grad is None for p in model.model.parameters())
    assert all(p.grad is None for p in clip.cond_stage_model.parameters())
    root = folder_paths.get_folder_paths("facecond_celebbasis")[0]
    loaded, info = load_mlp(os.path.join(root, name))
    assert torch.equal(loaded.fc.weight, mlp.mlp.fc.weight) and info["steps"] == 1
    # resume: 1 more step from the saved state equals one 2-step run, bit for bit
    two = TrainCelebBasis().train(model, clip, vae, images, fe, "a,a,b", "a photo of {}", 2, 0.01, P, 0, True,
                                  "nodes_test/two", False, resolution=64)[0]
    resumed = TrainCelebBasis().train(model, clip, vae, images, fe, "a,a,b", "a photo of {}", 2, 0.01, P, 0, True,
                                      "nodes_test/train", True, resolution=64)[0]
    assert torch.equal(two.mlp.fc.weight, resumed.mlp.fc.weight)


def test_training_loss_falls_on_fixed_batch(tiny_model, train_inputs, basis):
    """Gradients reach the MLP through CLIP and the UNet; a few Adam steps on one batch lower its loss."""
    from facecond.nodes.celebbasis.training import encode_images, model_denoiser
    from facecond.py.celebbasis.coeffs import new_mlp
    from facecond.py.train.core import TrainConfig, Trainer

    model, clip, vae = tiny_model
    images, fe = train_inputs
    denoise, sigmas, _ = model_denoiser(model, "t")
    x0 = encode_images(vae, model, images[:1])
    tokens = template_tokens(clip, ["a photo of {}"], "t")[0]
    mlp = new_mlp(D, basis, 0)
    g = step_generator(0, 0)
    sigma, _ = sample_sigmas(sigmas[200:400], 1, g)
    noise = sample_noise(x0, g)

    def loss_fn(step, _g):
        ctx = encode_with(clip, tokens, basis.embeddings(mlp(fe.embeds[:1])[0]))
        return denoising_loss(denoise, x0, ctx, sigma, noise)

    with torch.inference_mode(False), torch.enable_grad():
        start = loss_fn(0, g).item()
        grads = torch.autograd.grad(loss_fn(0, g), list(mlp.parameters()))
    assert all(gr.abs().sum() > 0 for gr in grads)
    Trainer(dict(mlp.named_parameters()), TrainConfig(steps=6, lr=0.1)).run(loss_fn)
    with torch.inference_mode(False), torch.enable_grad():
        end = loss_fn(0, g).item()
    assert end < start


def test_trainer_loss_is_the_denoising_loss_of_its_draws(tiny_model, train_inputs, basis):
    """The node's first recorded loss, recomputed by hand from step 0's generator: image i, template t, σ, ε
    in that order, person ids[i]'s mean embedding through the seeded MLP, the word at the template's {}."""
    from facecond.nodes.celebbasis.training import encode_images, model_denoiser
    from facecond.py.celebbasis.coeffs import new_mlp
    from facecond.py.train.core import read_state

    model, clip, vae = tiny_model
    images, fe = train_inputs
    seed, templates, ids = 11, ["a photo of {}", "{} smiling"], [0, 0, 1]
    TrainCelebBasis().train(model, clip, vae, images, fe, "a,a,b", "\n".join(templates), 1, 0.01, P, seed, False,
                            "nodes_test/loss", False, resolution=64)
    root = folder_paths.get_folder_paths("facecond_celebbasis")[0]
    recorded = read_state(os.path.join(root, "nodes_test", "loss.state.safetensors"))[0]["losses"]
    denoise, sigmas, _ = model_denoiser(model, "t")
    g = step_generator(seed, 0)
    i, t = int(torch.randint(0, 3, (1,), generator=g)), int(torch.randint(0, 2, (1,), generator=g))
    x0 = encode_images(vae, model, images)[i:i + 1]
    sigma, _ = sample_sigmas(sigmas, 1, g)
    noise = sample_noise(x0, g)
    people = torch.nn.functional.normalize(torch.stack([fe.embeds[:2].mean(0), fe.embeds[2]]), dim=-1)
    with torch.inference_mode(False), torch.no_grad():
        vectors = basis.embeddings(new_mlp(D, basis, seed)(people[ids[i]:ids[i] + 1])[0])
        tokens = template_tokens(clip, templates, "t")[t]
        loss = denoising_loss(denoise, x0, encode_with(clip, tokens, vectors), sigma, noise)
    assert len(recorded) == 1 and recorded[0] == pytest.approx(float(loss), rel=1e-6)


def test_trainer_bad_inputs(tiny_model, train_inputs):
    model, clip, vae = tiny_model
    images, fe = train_inputs
    node = TrainCelebBasis()
    with pytest.raises(ValueError, match="3 images but 2 face embeddings"):
        node.train(model, clip, vae, images, _embeds(2), "", "a photo of {}", 1, 0.01, P, 0, False, "x", False,
                   resolution=64)
    with pytest.raises(ValueError, match="2 labels for 3 images"):
        node.train(model, clip, vae, images, fe, "a,b", "a photo of {}", 1, 0.01, P, 0, False, "x", False,
                   resolution=64)
    with pytest.raises(ValueError, match=r"must contain \{\} exactly once"):
        node.train(model, clip, vae, images, fe, "", "a photo of someone", 1, 0.01, P, 0, False, "x", False,
                   resolution=64)


@pytest.fixture(scope="module")
def paper_names(shared_data):
    """The Celeb Basis paper's list (first 40 names), put into models/facecond/names as a user would."""
    names = cb.load_names(shared_data / "names" / "celebbasis_wiki_names_v2.txt")[:40]
    root = folder_paths.get_folder_paths("facecond_names")[0]
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "paper40.txt"), "w", encoding="utf-8") as f:
        f.write("# the paper's list, first 40\n" + "\n".join(names) + "\n")
    with open(os.path.join(root, "broken.txt"), "wb") as f:
        f.write(b"\xff\xfeT\x00o\x00m\x00")  # UTF-16: not UTF-8 text
    return names


def test_names_inputs_resolve_and_refuse_bad_lists(paper_names):
    from facecond.nodes.celebbasis.files import resolve_names

    spec = TrainCelebBasis.INPUT_TYPES()["optional"]
    assert spec["names_list"][0][0] == "bundled" and "paper40.txt" in spec["names_list"][0]
    assert spec["names_list"][1]["default"] == "bundled" and spec["names_text"][1]["multiline"]
    for cls in (CelebBasisCoeffs, TrainCelebBasis):  # every node that builds the basis has both
        assert {"names_list", "names_text"} <= set(cls.INPUT_TYPES()["optional"])
    assert resolve_names("N") == cb.load_names()
    assert resolve_names("N", "paper40.txt") == paper_names
    assert resolve_names("N", "paper40.txt", "Ada Lovelace\nAlan Turing") == ["Ada Lovelace", "Alan Turing"]
    with pytest.raises(ValueError, match=r"N: names_list 'broken.txt': .*is not UTF-8 text"):
        resolve_names("N", "broken.txt")
    with pytest.raises(ValueError, match=r"N: names_list '../paper40.txt' contains '..'"):
        resolve_names("N", "../paper40.txt")
    with pytest.raises(ValueError, match=r"N: names_list 'nope.txt' is not in .*names"):
        resolve_names("N", "nope.txt")
    with pytest.raises(ValueError, match=r"N: names_text: .*has no names"):
        resolve_names("N", "bundled", "# just a comment\n")


def test_custom_name_list_trains_and_builds_its_own_basis(tiny_model, train_inputs, paper_names, tmp_path):
    """TrainCelebBasis with names_list = the paper's list: the MLP file records that list, its basis rows are
    those names' token embeddings (mean = their mean, by hand), CelebBasisCoeffs rebuilds that basis from the
    MLP, and saved coefficients find the list again by its hash in models/facecond/names."""
    model, clip, vae = tiny_model
    images, _fe = train_inputs
    mlp, _name, report = TrainCelebBasis().train(model, clip, vae, images[:1], _embeds(1), "", "a photo of {}", 1,
                                                0.01, P, 0, False, "nodes_test/paper", False, resolution=64,
                                                names_list="paper40.txt")
    assert mlp.names == tuple(paper_names) and "at 64 px" in report
    enc = text_encoder(clip, "t")
    kept, ids = cb.name_token_pairs(paper_names, enc.tokenize)
    assert f"{len(kept)} names" in report
    b = basis_for(clip, paper_names, P, "t")[0]
    table = enc.table().detach().double()
    assert torch.allclose(b.mean.double(), torch.stack([table[ids[:, 0]].mean(0), table[ids[:, 1]].mean(0)]),
                          atol=1e-6)
    bundled = basis_for(clip, cb.load_names(), P, "t")[0]
    assert b.names_hash == mlp.facts.names_hash != bundled.names_hash
    out_clip, coeffs = CelebBasisCoeffs().apply(clip, "<ann>", "none", face_embeds=_embeds(1, 3), celeb_mlp=mlp)
    assert coeffs.facts.names_hash == b.names_hash
    ref = _encode(add_pseudo_word_for(clip, b.embeddings(coeffs.coeffs)), "a photo of <ann>")
    assert torch.equal(_encode(out_clip, "a photo of <ann>"), ref)
    # the coefficients alone: the list is found by its hash among models/facecond/names ...
    again = CelebBasisCoeffs().apply(clip, "<ann>", "none", coefficients=coeffs)[0]
    assert torch.equal(_encode(again, "a photo of <ann>"), ref)
    # ... or given as text; a list other than the MLP's is refused with the fix
    again = CelebBasisCoeffs().apply(clip, "<ann>", "none", coefficients=coeffs,
                                     names_text="\n".join(paper_names))[0]
    assert torch.equal(_encode(again, "a photo of <ann>"), ref)
    with pytest.raises(ValueError, match=r"CelebBasisCoeffs: names_list / names_text give a celebrity-name list "
                                         r".*leave names_list at 'bundled'"):
        CelebBasisCoeffs().apply(clip, "<ann>", "none", face_embeds=_embeds(1, 3), celeb_mlp=mlp,
                                 names_text="Ada Lovelace\nAlan Turing\nGrace Hopper")


def add_pseudo_word_for(clip, vectors):
    from facecond.nodes.celebbasis.pseudo_words import add_pseudo_word

    return add_pseudo_word(clip, "<ann>", vectors, "t")


@pytest.mark.parametrize("layer_idx", [None, -2])
def test_differentiable_encode_matches_comfy(tiny_model, layer_idx):
    clip = tiny_model[1].clone()
    if layer_idx is not None:
        clip.clip_layer(layer_idx)
    tokens = template_tokens(clip, ["a close-up photo of {} smiling"], "t")[0]
    vec = torch.randn(2, 768, generator=torch.Generator().manual_seed(0)) * 0.02
    ours = encode_with(clip, tokens, vec)
    from facecond.nodes.celebbasis.pseudo_words import (
        add_pseudo_word,  # ComfyUI's own path: the vectors as an embedding
    )

    ref = _encode(add_pseudo_word(clip, "<zed>", vec, "t"), "a close-up photo of <zed> smiling")
    assert torch.allclose(ours, ref, atol=1e-5)
