"""TrainFaceTI in-process on the tiny SD1.5 checkpoint (real CLIP-L tokenizer and token table): only the TI
vectors move, the loss falls on a fixed batch, the embedding file reloads through ComfyUI's own ``embedding:``
syntax and reproduces the conditioning bit for bit, and bad inputs give clear errors."""

from __future__ import annotations

import os
import re

import folder_paths
import pytest
import torch
from safetensors import safe_open

import nodes
from facecond.nodes.celebbasis.inversion import TrainFaceTI
from facecond.nodes.celebbasis.pseudo_words import add_pseudo_word, text_encoder
from facecond.nodes.celebbasis.training import encode_images, encode_with, model_denoiser, template_tokens
from facecond.py.celebbasis import inversion as inv
from facecond.py.faces.types import FaceEmbeds
from facecond.py.train.core import TrainConfig, Trainer, denoising_loss, sample_noise, sample_sigmas, step_generator


def _encode(clip, text):
    with torch.inference_mode():
        return nodes.CLIPTextEncode().encode(clip, text)[0][0][0]


@pytest.fixture(scope="module")
def photos():
    return torch.rand(3, 64, 64, 3, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def trained(tiny_model, photos):
    model, clip, vae = tiny_model
    unet_before = {k: v.clone() for k, v in list(model.model.diffusion_model.state_dict().items())[:6]}
    table_before = text_encoder(clip, "t").table().clone()
    out = TrainFaceTI().train(model, clip, vae, photos, "face", 2, "log_norm_e", "a photo of {}", 2, 0.005, 0,
                              True, "nodes_test_ti", resolution=64)
    return out, unet_before, table_before


def test_trains_only_the_ti_vectors(tiny_model, trained):
    model, clip, _ = tiny_model
    (out_clip, name, report), unet_before, table_before = trained
    assert name == "nodes_test_ti" and "2 steps, 3 images, K=2, init face" in report and "embedding:nodes_test_ti" \
        in report
    for k, v in unet_before.items():
        assert torch.equal(model.model.diffusion_model.state_dict()[k], v)
    assert torch.equal(text_encoder(clip, "t").table(), table_before)
    assert all(p.grad is None for p in model.model.parameters())
    assert all(p.grad is None for p in clip.cond_stage_model.parameters())
    assert out_clip is not clip


def test_embedding_file_reloads_through_comfy_embedding_syntax(tiny_model, trained):
    clip = tiny_model[1]
    path = os.path.join(folder_paths.get_folder_paths("embeddings")[0], "nodes_test_ti.safetensors")
    with safe_open(path, framework="pt") as f:
        meta, vectors = f.metadata(), f.get_tensor("clip_l")
    assert meta["facecond.kind"] == "face_ti" and meta["reparam"] == "log_norm_e" and meta["steps"] == "2"
    assert meta["resolution"] == "64"
    assert vectors.shape == (2, 768)
    face_init = text_encoder(clip, "t").table()[text_encoder(clip, "t").tokenize("human face")].float()
    assert not torch.equal(vectors, face_init)  # training moved them
    # norms stay near the init's (log-norm parameterisation, 2 small steps)
    assert torch.allclose(vectors.norm(dim=-1), face_init.norm(dim=-1), rtol=0.1)
    # ComfyUI's own path: the prompt's embedding:NAME becomes exactly the file's vectors ...
    toks = clip.tokenize("a photo of embedding:nodes_test_ti smiling")["l"][0]
    emb = [t for t, _ in toks if torch.is_tensor(t)]
    assert len(emb) == 2 and all(torch.equal(e, v) for e, v in zip(emb, vectors))
    # ... and the conditioning equals the trained vectors injected in memory, bit for bit
    ref = _encode(add_pseudo_word(clip, "<ti>", vectors, "t"), "a photo of <ti> smiling")
    assert torch.equal(_encode(clip, "a photo of embedding:nodes_test_ti smiling"), ref)


def test_loss_falls_on_fixed_batch(tiny_model, photos):
    model, clip, vae = tiny_model
    denoise, sigmas, _ = model_denoiser(model, "t")
    x0 = encode_images(vae, model, photos[:1])
    tokens = template_tokens(clip, ["a photo of {}"], "t", k=2)[0]
    enc = text_encoder(clip, "t")
    start, _ = inv.init_vectors("face", enc.table(), enc.tokenize, 2)
    vecs = inv.TIVectors(start, "log_norm_2")
    g = step_generator(0, 0)
    sigma, _ = sample_sigmas(sigmas[200:400], 1, g)
    noise = sample_noise(x0, g)

    def loss_fn(step, _g):
        return denoising_loss(denoise, x0, encode_with(clip, tokens, vecs.vectors(), "t"), sigma, noise)

    with torch.inference_mode(False), torch.enable_grad():
        before = loss_fn(0, g).item()
    Trainer(vecs.params, TrainConfig(steps=3, lr=0.05, betas=(0.9, 0.98))).run(loss_fn)
    with torch.inference_mode(False), torch.enable_grad():
        after = loss_fn(0, g).item()
    assert after < before


def test_trainer_loss_is_the_denoising_loss_of_its_draws(tiny_model, photos):
    """The node's first loss (in the embedding's metadata), recomputed by hand from step 0's generator: image i,
    template t, σ, ε in that order, the 'human face' init through the log-norm parameterisation."""
    model, clip, vae = tiny_model
    seed, templates = 3, ["a photo of {}", "{} smiling"]
    TrainFaceTI().train(model, clip, vae, photos, "face", 2, "log_norm_2", "\n".join(templates), 1, 0.005, seed,
                        False, "nodes_test_ti_loss", resolution=64)
    path = os.path.join(folder_paths.get_folder_paths("embeddings")[0], "nodes_test_ti_loss.safetensors")
    with safe_open(path, framework="pt") as f:
        recorded = [float(x) for x in f.metadata()["losses"].strip("[]").split(",")]
    denoise, sigmas, _ = model_denoiser(model, "t")
    g = step_generator(seed, 0)
    i, t = int(torch.randint(0, 3, (1,), generator=g)), int(torch.randint(0, 2, (1,), generator=g))
    x0 = encode_images(vae, model, photos)[i:i + 1]
    sigma, _ = sample_sigmas(sigmas, 1, g)
    noise = sample_noise(x0, g)
    enc = text_encoder(clip, "t")
    start, _ = inv.init_vectors("face", enc.table(), enc.tokenize, 2)
    with torch.inference_mode(False), torch.no_grad():
        vectors = inv.TIVectors(start, "log_norm_2").vectors()
        tokens = template_tokens(clip, templates, "t", k=2)[t]
        loss = denoising_loss(denoise, x0, encode_with(clip, tokens, vectors, "t"), sigma, noise)
    assert len(recorded) == 1 and recorded[0] == pytest.approx(float(loss), rel=1e-6)


def test_bad_inputs(tiny_model, photos):
    model, clip, vae = tiny_model
    node = TrainFaceTI()
    args = ("a photo of {}", 1, 0.005, 0, False)
    with pytest.raises(ValueError, match=r"TrainFaceTI: save_name 'my face' must be letters"):
        node.train(model, clip, vae, photos, "face", 2, "none", *args, "my face")
    with pytest.raises(ValueError, match="init='id' needs face_embeds"):
        node.train(model, clip, vae, photos, "id", 2, "none", *args, "x")
    fe = FaceEmbeds(torch.nn.functional.normalize(torch.randn(3, 16), dim=-1), "test/none", True, (0, 1, 2))
    with pytest.raises(ValueError, match=r"init='id' needs celebrity face embeddings .*PrecomputeCelebFaces node "
                                         r"once.*--precompute-celeb-faces"):
        node.train(model, clip, vae, photos, "id", 2, "none", *args, "x", face_embeds=fe)
    with pytest.raises(ValueError, match=r"must contain \{\} exactly once"):
        node.train(model, clip, vae, photos, "face", 2, "none", "a photo", 1, 0.005, 0, False, "x")


def test_precompute_generates_detects_and_says_when_the_model_draws_no_faces(tiny_model, stand_in_models):
    """The precompute loop really samples each name and runs detection on it; the tiny random model draws no
    faces, which must end in the clear error (its success path needs a model that draws faces: not here)."""
    from facecond.nodes.celebbasis.inversion import precompute_celeb_faces
    from facecond_dev import host

    model, clip, vae = tiny_model
    with torch.inference_mode(), pytest.raises(ValueError, match="no face was detected in any of the 2 generated"):
        precompute_celeb_faces(model, clip, vae, ["Ada Lovelace", "Alan Turing"], "mtcnn",
                               host.STAND_IN_RECOGNISER, steps=1, size=64)


def test_training_resolution_defaults_to_the_model_native_size(tiny_model):
    """resolution 0 = the model's native side (the tiny checkpoint is SD1.5: 512); a given side is used as is;
    crops are the centred square, resized."""
    from facecond.nodes.celebbasis.training import native_resolution, training_images

    model = tiny_model[0]
    assert native_resolution(model) == 512
    crops = torch.rand(2, 160, 160, 3, generator=torch.Generator().manual_seed(1))
    big, side = training_images(model, crops, 0, "TrainFaceTI")
    assert side == 512 and big.shape == (2, 512, 512, 3) and 0 <= float(big.min()) and float(big.max()) <= 1
    same, side = training_images(model, crops, 160, "TrainFaceTI")
    assert side == 160 and torch.equal(same, crops)  # already that size: untouched
    with pytest.raises(ValueError, match=r"TrainFaceTI: resolution 100 must be 0 \(the model's native size\) or a "
                                         r"multiple of 8"):
        training_images(model, crops, 100, "TrainFaceTI")
    spec = TrainFaceTI.INPUT_TYPES()["optional"]["resolution"]
    assert spec[0] == "INT" and spec[1]["default"] == 0


@pytest.fixture(scope="module")
def celeb_folder(shared_data, stand_in_models):
    """input/celeb_test: one sub-folder per celebrity (real photos from ../shared/data/faces), one without a
    face (a flat grey image), and a stray file at the top (ignored)."""
    import shutil

    from PIL import Image

    root = os.path.join(folder_paths.get_input_directory(), "celeb_test")
    faces = shared_data / "faces"
    for sub, files in {"Barack_Obama": [faces / "obama" / "obama.jpg", faces / "obama" / "obama2.jpg"],
                       "Joe Biden": [faces / "biden" / "biden.jpg"]}.items():
        os.makedirs(os.path.join(root, sub), exist_ok=True)
        for f in files:
            shutil.copy(f, os.path.join(root, sub, f.name))
    os.makedirs(os.path.join(root, "Nobody Here"), exist_ok=True)
    Image.new("RGB", (96, 96), (128, 128, 128)).save(os.path.join(root, "Nobody Here", "grey.png"))
    open(os.path.join(root, "notes.txt"), "w").write("not a folder")
    os.makedirs(os.path.join(folder_paths.get_input_directory(), "celeb_empty"), exist_ok=True)
    return root


def _embed_photo(path):
    from facecond.nodes.celebbasis.celeb_photos import _load
    from facecond.nodes.faces.detect_embed import FacecondFaceDetectCrop, FacecondFaceEmbed
    from facecond_dev import host

    faces = FacecondFaceDetectCrop().detect(_load(str(path)), detector="mtcnn", select="largest", face_index=0,
                                            min_size=20, margin_scale=1.0, upright="rotate_if_no_face",
                                            no_face="error")[0]
    return FacecondFaceEmbed().embed(faces, host.STAND_IN_RECOGNISER, "bottleneck_512", "auto")[0]


def test_celeb_photo_faces_id_init_and_filter(tiny_model, celeb_folder, shared_data, photos):
    """CelebPhotoFaces: a name's row is the cosine centroid of its photos' FaceEmbed embeddings (recomputed here
    photo by photo); TrainFaceTI init='id' then starts from the closest name's two tokens; the filter drops a
    name whose 'generated portrait' is not that person."""
    from facecond.nodes.celebbasis.celeb_photos import CelebPhotoFaces
    from facecond_dev import host

    faces, report = CelebPhotoFaces().embed("celeb_test", "mtcnn", host.STAND_IN_RECOGNISER, 0.3)
    assert faces.names == ("Barack Obama", "Joe Biden", "Nobody Here")
    assert faces.found.tolist() == [True, True, False] and "no face: Nobody Here" in report
    o1, o2 = (_embed_photo(shared_data / "faces" / "obama" / f) for f in ("obama.jpg", "obama2.jpg"))
    by_hand = torch.nn.functional.normalize(torch.nn.functional.normalize(
        torch.cat([o1.embeds, o2.embeds]), dim=-1).mean(0), dim=0)
    assert torch.allclose(faces.embeds[0], by_hand, atol=1e-6) and faces.embedder == o1.model
    person = _embed_photo(shared_data / "faces" / "obama" / "obama3.jpg")  # a third photo, not in the folder
    cos = faces.embeds[:2] @ torch.nn.functional.normalize(person.embeds[0], dim=0)
    assert float(cos[0]) > float(cos[1])  # the recogniser does tell them apart
    model, clip, vae = tiny_model
    out = TrainFaceTI().train(model, clip, vae, photos, "id", 2, "none", "a photo of {}", 1, 0.005, 0, False,
                              "nodes_test_ti_id", face_embeds=person, resolution=64, celeb_faces=faces)
    assert "init id: Barack Obama" in out[2]
    path = os.path.join(folder_paths.get_folder_paths("embeddings")[0], "nodes_test_ti_id.safetensors")
    with safe_open(path, framework="pt") as f:
        assert f.metadata()["init"] == "id: Barack Obama"
    # the filter: the 'model' draws Obama as Biden (his portrait's embedding is Biden's centroid): he is dropped
    generated = inv.CelebFaces(torch.stack([faces.embeds[1], faces.embeds[1]]), torch.tensor([True, True]),
                               ("Barack Obama", "Joe Biden"), "m", faces.embedder, {})
    kept, report = CelebPhotoFaces().embed("celeb_test", "mtcnn", host.STAND_IN_RECOGNISER, 0.99,
                                           generated_faces=generated)
    assert kept.found.tolist() == [False, True, False] and "dropped Barack Obama" in report
    out = TrainFaceTI().train(model, clip, vae, photos, "id", 2, "none", "a photo of {}", 1, 0.005, 0, False,
                              "nodes_test_ti_id", face_embeds=person, resolution=64, celeb_faces=kept)
    assert "init id: Joe Biden" in out[2]
    with pytest.raises(ValueError, match=r"TrainFaceTI: celeb_faces were embedded with .* but face_embeds with "
                                         r"'test/none'"):
        TrainFaceTI().train(model, clip, vae, photos, "id", 2, "none", "a photo of {}", 1, 0.005, 0, False, "x",
                            face_embeds=FaceEmbeds(torch.ones(1, 128), "test/none", False, (0,)), resolution=64,
                            celeb_faces=faces)
    with pytest.raises(ValueError, match="CelebPhotoFaces: the filter dropped every celebrity"):
        CelebPhotoFaces().embed("celeb_test", "mtcnn", host.STAND_IN_RECOGNISER, 1.0,
                                generated_faces=inv.CelebFaces(-faces.embeds[:2].nan_to_num(0), torch.tensor(
                                    [True, True]), faces.names[:2], "m", faces.embedder, {}))


def test_celeb_photo_folder_must_stay_inside_the_input_folder(celeb_folder):
    from facecond.nodes.celebbasis.celeb_photos import CelebPhotoFaces
    from facecond_dev import host

    node = CelebPhotoFaces()
    for bad, why in [("../celeb_test", "contains '..'"), ("/etc", "is an absolute path"),
                     ("no_such_folder", "is not a folder there"), ("celeb_test/notes.txt", "is not a folder there")]:
        with pytest.raises(ValueError, match=re.escape(f"CelebPhotoFaces: folder '{bad}' {why}") + ".*Give a folder "
                           "inside"):
            node.embed(bad, "mtcnn", host.STAND_IN_RECOGNISER, 0.3)
    with pytest.raises(ValueError, match="has no sub-folder with photos"):
        node.embed("celeb_empty", "mtcnn", host.STAND_IN_RECOGNISER, 0.3)
