"""Train the self-attention reference aggregator of multi-reference IP-Adapter (K. M. Kazistova, I. D. Stepanov,
A. V. Filatov, "Создание персонализированных генераций изображений" [Creating personalized image generations], MIPT /
Skoltech; undated, no arXiv id) on a folder of people, leave-one-out, with the pack's shared training core
(py/train/core.py).

Data: ``DATA/<person>/<image>`` (jpg/png/webp), one subfolder per person; an optional ``<image>.txt`` next to an
image is its caption (else ``--caption``). People are split train/test 2:1 by person (seeded), as the paper does.
Each step: pick a training person and one of their images at random (the target); aggregate the embeddings of
the *other* images with the aggregator G (cut / bootstrapped to N = ``--refs``); project them with the
IP-Adapter and denoise the noised target latent conditioned on its caption + the image tokens (decoupled
cross-attention, λ = 1); loss: the ε-denoising loss. At the end the held-out people's leave-one-out loss is
reported for the trained model and for plain mean pooling into the unchanged IP-Adapter (same seeds).

``--attention``: ``residual`` (default, the pack's first version: mean(X + attention·W_out), W_out = 0 at the
start, i.e. mean pooling) or ``paper`` (exactly Algorithm 1, mean of its N outputs Z·W_out; see
py/ipadapter/aggregate.py). The mode is written to the file's metadata (``attention``).
``--train``: ``aggregator`` (default): only G trains; the file works with the unchanged public IP-Adapter.
``adapter``: as the paper ("обучаемыми являются слои Self-Attention, Linear, Layer Norm и Cross-Attention"):
G + the IP-Adapter's image projection (Linear + LayerNorm; FaceID: its MLP + LayerNorm) + every W'_k, W'_v
(to_k_ip / to_v_ip); the U-Net and the encoders stay frozen, the loaded IP-Adapter is copied, never changed.

Output: models/facecond/aggregators/NAME.safetensors (the aggregator, what AggregateEmbeds lists) and, with
``--train adapter``, models/ipadapter/NAME.safetensors: a complete IP-Adapter file (``image_proj.*`` +
``ip_adapter.*``, the source file's other tensors such as a FaceID LoRA carried over) with the same aggregator
under ``aggregator.*``; LoadIPAdapter loads it, and the two belong together. Their paths are printed on stdout.

Embeddings: FaceID adapters take face embeddings (FaceDetectCrop mtcnn, no_face=skip, + FaceEmbed with
``--recogniser``); plain/plus adapters take CLIP-vision outputs (``--clip-vision``, ComfyUI's loader).
Usage (ComfyUI base directory with models/; the output goes to models/facecond/aggregators):

    .host/venv/bin/python -P scripts/train_aggregator.py --data DIR --base-dir COMFY_BASE \\
        --ckpt v1-5-pruned-emaonly.safetensors --ipadapter ip-adapter-faceid_sd15.bin \\
        --recogniser buffalo_l/w600k_r50.onnx --refs 9 --steps 2000 --name my_aggregator
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("facecond.train_aggregator")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
ATTENTION_CHOICES = ("residual", "paper")  # py/ipadapter/aggregate.py ATTENTION_MODES
TRAIN_CHOICES = ("aggregator", "adapter")


@dataclass
class Person:
    name: str
    embeds: torch.Tensor  # (M, ...) one row per usable image
    latents: torch.Tensor  # (M, 4, h, w) in the model's latent space
    contexts: torch.Tensor  # (M, 77, C) caption encodings
    adms: torch.Tensor | None = None  # (M, D) SDXL's ADM vectors y (pooled caption + size conditioning); else None


def split_people(names: list[str], seed: int) -> tuple[list[str], list[str]]:
    """(train, test): the people shuffled with the seed, every third one to test (2:1 by person)."""
    order = sorted(names)
    random.Random(seed).shuffle(order)
    test = order[2::3]
    return [n for n in order if n not in test], test


def load_image(path: Path, size: int) -> torch.Tensor:
    """(1, size, size, 3) float in [0, 1], EXIF-upright, centre-cropped (ComfyUI IMAGE layout)."""
    img = ImageOps.fit(ImageOps.exif_transpose(Image.open(path)).convert("RGB"), (size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(img, np.float32) / 255.0)[None]


def embed_images(images: torch.Tensor, adapter, recogniser: str, clip_vision) -> tuple[torch.Tensor, list[int]]:
    """(rows, kept image indices) with the embedding the adapter takes; faceless images are skipped."""
    from facecond.nodes.faces.detect_embed import FacecondFaceDetectCrop, FacecondFaceEmbed
    from facecond.nodes.ipadapter.adapter import IPAdapterEncode

    if adapter.variant.input_kind == "face":
        faces = FacecondFaceDetectCrop().detect(images, detector="mtcnn", select="largest", face_index=0,
                                                min_size=20, margin_scale=1.0, upright="off", no_face="skip")[0]
        if len(faces) == 0:
            return torch.zeros(0, adapter.variant.input_dim), []
        fe = FacecondFaceEmbed().embed(faces, recogniser, "bottleneck_512", "auto")[0]
        embeds = IPAdapterEncode().encode(adapter, "center", face_embeds=fe)[0]
    else:
        embeds = IPAdapterEncode().encode(adapter, "center", image=images, clip_vision=clip_vision)[0]
    return embeds.embeds, list(embeds.source_index)


def build_people(data: Path, names: list[str], model, clip, vae, adapter, *, size: int, caption: str,
                 recogniser: str, clip_vision, max_images: int) -> list[Person]:
    from facecond.py.train import denoiser

    out, encoded = [], {}
    for name in names:
        files = sorted(p for p in (data / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:max_images]
        if len(files) < 2:
            log.warning("skipping %s: %d image(s), leave-one-out needs at least 2", name, len(files))
            continue
        with torch.inference_mode():
            # references are embedded at >= 224 px (face detection needs pixels); the latents are made at `size`
            images = torch.cat([load_image(f, max(size, 224)) for f in files])
            embeds, kept = embed_images(images, adapter, recogniser, clip_vision)
            if len(kept) < 2:
                log.warning("skipping %s: a face was found in %d of %d images", name, len(kept), len(files))
                continue
            if len(kept) < len(files):
                log.info("%s: images without a face skipped: %s", name, [files[i].name for i in range(len(files))
                                                                          if i not in kept])
            small = torch.nn.functional.interpolate(images[kept].movedim(-1, 1), size=(size, size), mode="bilinear",
                                                    antialias=True, align_corners=False).movedim(1, -1)
            latents = model.model.process_latent_in(vae.encode(small)).float()
            contexts, adms = [], []
            for i in kept:
                txt = files[i].with_suffix(files[i].suffix + ".txt")
                text = txt.read_text().strip() if txt.is_file() else caption
                if text not in encoded:  # the shared --caption is encoded once (SDXL's CLIP-G is the slow part)
                    encoded[text] = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
                context, pooled = encoded[text]
                contexts.append(context.float())
                # square centre crops resized to `size`: original = target = size, crop (0, 0), as ComfyUI samples
                adm = denoiser.adm_vector(model.model, pooled, size, size)
                adms.append(adm.float() if adm is not None else None)
        y = torch.cat(adms).clone() if adms and adms[0] is not None else None
        out.append(Person(name, embeds.float().clone(), latents.clone(), torch.cat(contexts).clone(), y))
    return out


def leave_one_out_loss(person: Person, aggregate, adapter, layers, denoise, sigmas, g: torch.Generator,
                       n_refs: int):
    """One leave-one-out denoising loss for ``person`` (random target, G over the others)."""
    from facecond.py.ipadapter import adapter as ipa
    from facecond.py.ipadapter.aggregate import fit_count
    from facecond.py.train.core import denoising_loss, sample_noise, sample_sigmas

    m = person.embeds.shape[0]
    t = int(torch.randint(0, m, (1,), generator=g))
    others = person.embeds[[i for i in range(m) if i != t]]
    refs, _ = fit_count(others, n_refs, seed=int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
    seq = refs.reshape(refs.shape[0], -1, refs.shape[-1]).transpose(0, 1)  # (T, N, D)
    agg = aggregate(seq).reshape(1, *refs.shape[1:])
    tokens = adapter.proj(agg)  # (1, tokens, C); gradients flow back into G (and the projection, W'_k, W'_v)
    negative = tokens.detach() * 0
    terms = ipa.layer_terms(adapter, tokens, negative, 1.0, float("inf"), 0.0, None)
    patches = {key: ipa.IPAttentionPatch((term,)) for (key, _, _), term in zip(layers, terms)}
    x0 = person.latents[t:t + 1]
    sigma, _ = sample_sigmas(sigmas, 1, g)
    noise = sample_noise(x0, g)

    def call(x, s, context):
        opts = {"patches_replace": {"attn2": patches}, "sigmas": s, "cond_or_uncond": [0]}
        return denoise(x, s, context, opts, None if person.adms is None else person.adms[t:t + 1])

    return denoising_loss(call, x0, person.contexts[t:t + 1], sigma, noise)


def train(people_train: list[Person], people_test: list[Person], model, adapter, *, n_refs: int, heads: int,
          steps: int, lr: float, seed: int, state_path: Path | None = None, resume: bool = False,
          eval_rounds: int = 4, attention: str = "residual", train_what: str = "aggregator"):
    """Train G (``train_what="aggregator"``) or G + a copy of the IP-Adapter's projection and W'_k, W'_v
    (``"adapter"``). Returns (aggregator, adapter, train losses, {"self-attention": test loss, "mean": test loss}):
    ``adapter`` is the fine-tuned copy (or the given one, untouched); the test losses are averaged over
    ``eval_rounds`` seeded leave-one-out draws per held-out person, "mean" = mean pooling into the given adapter."""
    from facecond.nodes.common import Progress
    from facecond.nodes.ipadapter.adapter import cross_attention_layers
    from facecond.py.ipadapter import finetune
    from facecond.py.ipadapter.aggregate import SelfAttentionAggregator
    from facecond.py.train import denoiser
    from facecond.py.train.core import TrainConfig, Trainer, step_generator

    if not people_train:
        raise ValueError("train_aggregator: no training person with at least 2 usable images")
    if train_what not in TRAIN_CHOICES:
        raise ValueError(f"train_aggregator: train must be one of {TRAIN_CHOICES}, got {train_what!r}")
    layers = cross_attention_layers(model)
    ms = model.get_model_object("model_sampling")
    inner = model.model

    def denoise(x, sigma, context, opts, y=None):
        return denoiser.denoise(inner, x, sigma, context, y=y, transformer_options=opts)

    dim = people_train[0].embeds.shape[-1]
    torch.manual_seed(seed)
    g_module = SelfAttentionAggregator(dim, n_refs, heads, attention)
    params = dict(g_module.named_parameters())  # the names of the state files from before --train
    tuned = adapter
    if train_what == "adapter":  # names as in the saved IP-Adapter file
        tuned = finetune.trainable_copy(adapter)
        params = {f"aggregator.{k}": p for k, p in params.items()} | finetune.trainable_params(tuned)
    trainer = Trainer(params, TrainConfig(steps=steps, lr=lr, seed=seed))
    if resume and state_path is not None and state_path.is_file():
        trainer.load(str(state_path))
        log.info("resuming at step %d", trainer.step)

    def loss_fn(step, g):
        person = people_train[int(torch.randint(0, len(people_train), (1,), generator=g))]
        return leave_one_out_loss(person, g_module, tuned, layers, denoise, ms.sigmas, g, n_refs)

    losses = trainer.run(loss_fn, progress=Progress(steps, label="train_aggregator"))
    if state_path is not None:
        trainer.save(str(state_path))
    g_module.eval().requires_grad_(False)
    if tuned is not adapter:
        tuned.proj.eval().requires_grad_(False)
        tuned = dataclasses.replace(tuned, kv=tuple((k.detach(), v.detach()) for k, v in tuned.kv))
    test = {}
    with torch.no_grad():
        for label, module, ada in (("self-attention", g_module, tuned), ("mean", lambda s: s.mean(1), adapter)):
            vals = [float(leave_one_out_loss(p, module, ada, layers, denoise, ms.sigmas,
                                             step_generator(seed + 1, k), n_refs))
                    for k in range(eval_rounds) for p in people_test]
            test[label] = sum(vals) / len(vals) if vals else float("nan")
    return g_module, tuned, losses, test


def save_outputs(g_module, tuned, adapter, losses, test, people_train, people_test, *, name: str, source_name: str,
                 source_path: str, train_what: str, refs: int) -> list[Path]:
    """Write models/facecond/aggregators/NAME.safetensors and, for ``train_what="adapter"``,
    models/ipadapter/NAME.safetensors (the tuned adapter with the aggregator inside); returns their paths."""
    import folder_paths

    from facecond.nodes.ipadapter.adapter import IPADAPTER_FOLDER
    from facecond.py.ipadapter import adapter as ipa
    from facecond.py.ipadapter import finetune
    from facecond.py.ipadapter.aggregate import FILE_PREFIX as PREFIX
    from facecond.py.ipadapter.aggregate import aggregator_tensors, save_aggregator

    adapter_path = Path(folder_paths.get_folder_paths(IPADAPTER_FOLDER)[0]) / f"{name}.safetensors"
    out_dir = Path(folder_paths.get_folder_paths("facecond_aggregators")[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    paired = adapter_path.name if train_what == "adapter" else source_name
    meta = {"kind": adapter.variant.input_kind, "ipadapter": paired, "source_ipadapter": source_name,
            "train": train_what, "refs": str(refs),
            "train_people": ",".join(p.name for p in people_train),
            "test_people": ",".join(p.name for p in people_test),
            "final_train_loss": f"{losses[-1]:.6f}" if losses else "",
            "test_loss_self_attention": f"{test['self-attention']:.6f}", "test_loss_mean": f"{test['mean']:.6f}"}
    path = out_dir / f"{name}.safetensors"
    save_aggregator(g_module, path, meta)
    written = [path]
    if train_what == "adapter":
        from safetensors.torch import save_file

        tensors = finetune.adapter_file_tensors(tuned, ipa.read_file(source_path)) | aggregator_tensors(g_module,
                                                                                                         PREFIX)
        adapter_path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(adapter_path), metadata={**meta, "attention": g_module.attention})
        written.append(adapter_path)
    return written


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="folder with one subfolder of photos per person")
    ap.add_argument("--base-dir", type=Path, required=True, help="ComfyUI base directory (its models/ folder)")
    ap.add_argument("--ckpt", required=True,
                    help="checkpoint name in models/checkpoints (the IP-Adapter's family: SD1.5 or SDXL)")
    ap.add_argument("--ipadapter", required=True, help="IP-Adapter file name in models/ipadapter")
    ap.add_argument("--recogniser", default="buffalo_l/w600k_r50.onnx", help="FaceEmbed model (FaceID adapters)")
    ap.add_argument("--clip-vision", default=None, help="CLIP-vision file in models/clip_vision (plain/plus)")
    ap.add_argument("--refs", type=int, default=9, help="N, the references G is trained on (paper: 9)")
    ap.add_argument("--heads", type=int, default=1)
    ap.add_argument("--attention", choices=ATTENTION_CHOICES, default="residual",
                    help="paper: exactly Algorithm 1 (mean of Z·W_out); residual: mean(X + attention·W_out), "
                         "starts at mean pooling")
    ap.add_argument("--train", choices=TRAIN_CHOICES, default="aggregator", dest="train_what",
                    help="aggregator: G only (works with the unchanged IP-Adapter); adapter: G + the IP-Adapter's "
                         "projection and W'_k/W'_v, as the paper (also writes models/ipadapter/NAME.safetensors)")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=0,
                    help="training image side (pixels); 0: the model's native size (SD1.x 512, SD2-v 768, SDXL 1024)")
    ap.add_argument("--max-images", type=int, default=10, help="images per person (paper: 10)")
    ap.add_argument("--caption", default="a photo of a person", help="caption of images without a .txt")
    ap.add_argument("--name", default="aggregator", help="output file name (models/facecond/aggregators; "
                    "--train adapter: also models/ipadapter)")
    ap.add_argument("--resume", action="store_true", help="continue from NAME.state.safetensors")
    ap.add_argument("--eval-rounds", type=int, default=4, help="leave-one-out draws per held-out person")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    sys.path.insert(0, str(ROOT / "scripts"))
    from facecond_dev import host

    host.import_comfy(args.base_dir)
    host.load_pack(ROOT, "facecond")
    import comfy.clip_vision
    import folder_paths

    import nodes
    from facecond.nodes.ipadapter.adapter import IPADAPTER_FOLDER, LoadIPAdapter

    source = folder_paths.get_full_path_or_raise(IPADAPTER_FOLDER, args.ipadapter)
    adapter_path = Path(folder_paths.get_folder_paths(IPADAPTER_FOLDER)[0]) / f"{args.name}.safetensors"
    if args.train_what == "adapter" and os.path.realpath(adapter_path) == os.path.realpath(source):
        raise SystemExit(f"--name {args.name} would overwrite the source IP-Adapter {source}: pick another name")
    model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(args.ckpt)[:3]
    adapter = LoadIPAdapter().load(args.ipadapter)[0]
    cv = None
    if adapter.variant.input_kind != "face":
        if not args.clip_vision:
            raise SystemExit(f"{args.ipadapter} is a {adapter.variant.name} IP-Adapter: give --clip-vision")
        cv = comfy.clip_vision.load(folder_paths.get_full_path_or_raise("clip_vision", args.clip_vision))
    names = [p.name for p in args.data.iterdir() if p.is_dir()]
    train_names, test_names = split_people(names, args.seed)
    log.info("%d people: %d train, %d test", len(names), len(train_names), len(test_names))
    from facecond.nodes.model_family import resolve_resolution

    size = resolve_resolution(args.size, model, "train_aggregator", "--size")
    log.info("training at %d px", size)
    kw = dict(size=size, caption=args.caption, recogniser=args.recogniser, clip_vision=cv,
              max_images=args.max_images)
    people_train = build_people(args.data, train_names, model, clip, vae, adapter, **kw)
    people_test = build_people(args.data, test_names, model, clip, vae, adapter, **kw)
    out_dir = Path(folder_paths.get_folder_paths("facecond_aggregators")[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    g_module, tuned, losses, test = train(
        people_train, people_test, model, adapter, n_refs=args.refs, heads=args.heads, steps=args.steps, lr=args.lr,
        seed=args.seed, state_path=out_dir / f"{args.name}.state.safetensors", resume=args.resume,
        eval_rounds=args.eval_rounds, attention=args.attention, train_what=args.train_what)
    written = save_outputs(g_module, tuned, adapter, losses, test, people_train, people_test, name=args.name,
                           source_name=args.ipadapter, source_path=source, train_what=args.train_what, refs=args.refs)
    log.info("saved %s (%s mode, trained: %s); held-out leave-one-out loss: trained %.5f, mean pooling into %s "
             "%.5f", ", ".join(map(os.fspath, written)), g_module.attention, args.train_what, test["self-attention"],
             args.ipadapter, test["mean"])
    print("\n".join(map(os.fspath, written)))  # the paths, for scripts that call this one

if __name__ == "__main__":
    main()
