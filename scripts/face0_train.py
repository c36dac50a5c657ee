"""Train Face0 (Valevski et al. 2023): the face projection jointly with the U-Net, on shards from face0_prepare.py.

Runs alone or under ``accelerate launch`` (DDP over GPUs, nodes, or CPU processes with gloo). Loads a
ComfyUI-format SD1.x/SD2.x/SDXL checkpoint in-process (text encoder and VAE frozen; on SDXL the caption's pooled
CLIP-G output and each sample's stored original size and crop make the U-Net's ADM vector y), a fresh or saved
projection,
and trains projection + U-Net (``--mode full``) or projection + LoRA on chosen U-Net blocks (``--mode lora``)
with the shared ε-denoising loss (py/train/core.py), 10% face dropout, EMA, gradient accumulation, mixed
precision (accelerate's), checkpoints every --save-every steps (resume with --resume), TensorBoard logs
(loss, lr, samples/s) under OUT/logs. Exports (EMA weights by default) into OUT:
``face0_projection.safetensors`` (LoadFace0Projection: copy to models/facecond/face0) and
``face0_unet_lora.safetensors`` (LoraLoader: models/loras) or ``face0_checkpoint.safetensors`` (a full
checkpoint for CheckpointLoaderSimple). Details and multi-node commands: docs/TRAINING.md.

    accelerate launch scripts/face0_train.py --checkpoint sd15.safetensors --shards 'data/shard-*.tar' \\
        --out runs/face0 --mode lora --batch 8 --steps 20000 --mixed-precision bf16

Presets (--preset; any flag given explicitly overrides its value): ``small`` (default) 10k steps, batch 4, lr 2e-5,
EMA 0.9999, the 3.35M-parameter projection (width 768); ``paper`` (Face0 §2.3) 500k steps, a global batch of 256
by gradient accumulation (accum = 256 / (batch x processes)), lr 2e-5, EMA 0.9999, the ~10M-parameter projection
(width 1536). The paper's schedule is 128M samples (64 TPU-v4 in the paper); cost: docs/TRAINING.md §2.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from facecond_dev import host

log = logging.getLogger("facecond.face0_train")


def load_checkpoint(path: str):
    """(ModelPatcher, CLIP, VAE, base_model name) with the U-Net in float32 (master weights; autocast does the
    mixed precision); SystemExit with a clear message for a file that is not a supported SD checkpoint."""
    import comfy.sd

    from facecond.py.train.face0_train import check_family

    try:
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(path, model_options={"dtype": torch.float32})[:4]
    except (RuntimeError, ValueError, KeyError) as e:
        raise SystemExit(f"face0_train: cannot load {path} as a ComfyUI checkpoint: {str(e).splitlines()[0]}") from None
    base = model.model
    try:
        family = check_family(type(base.model_config).__name__, base.model_type.name,
                              int(base.model_config.unet_config.get("context_dim") or 0), f"face0_train ({path})")
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if clip is None or vae is None:
        raise SystemExit(f"face0_train: {path} lacks a text encoder or VAE; use a full SD checkpoint")
    return model, clip, vae, family


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="ComfyUI-format SD1.x/SD2.x/SDXL checkpoint (.safetensors)")
    ap.add_argument("--shards", required=True, nargs="+", help="shard files or globs from face0_prepare.py")
    ap.add_argument("--out", required=True, help="run folder: state/, logs/, exports, summary.json")
    ap.add_argument("--projection", help="start from this projection file (else a fresh one)")
    ap.add_argument("--mode", choices=("full", "lora"), default="full")
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--lora-alpha", type=float, default=16.0)
    ap.add_argument("--lora-blocks", default="input_blocks,middle_block,output_blocks",
                    help="comma list of U-Net blocks that get LoRA")
    ap.add_argument("--preset", choices=("small", "paper"), default="small",
                    help="defaults for the flags below: small (10k steps, batch 4, accum 1, width-768 projection) or "
                    "paper (500k steps, global batch 256 by accumulation, EMA 0.9999, lr 2e-5, width-1536 projection)")
    ap.add_argument("--steps", type=int, help="optimiser steps in total (small: 10000; paper: 500000)")
    ap.add_argument("--batch", type=int, help="per process and micro-step (both presets: 4)")
    ap.add_argument("--accum", type=int, help="gradient accumulation micro-steps (small: 1; paper: 256 / (batch x "
                    "processes))")
    ap.add_argument("--lr", type=float, help="both presets: 2e-5 (paper, at batch 256)")
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--ema-decay", type=float, help="both presets: 0.9999 (paper)")
    ap.add_argument("--face-drop", type=float, help="both presets: 0.1 (paper)")
    ap.add_argument("--proj-hidden", type=int, help="a fresh projection's width (small: 768; paper: 1536)")
    ap.add_argument("--proj-depth", type=int, help="a fresh projection's Linear layers (both presets: 4)")
    ap.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no", help="accelerate's")
    ap.add_argument("--save-every", type=int, default=1000, help="trainer state every N steps (and at the end)")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--resume", default=None, help="'auto' (latest state in OUT/state) or a state file")
    ap.add_argument("--export", choices=("ema", "raw"), default="ema", help="weights the exported files hold")
    ap.add_argument("--text-cache", type=int, default=4096, help="captions whose encoding is kept (0: off)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--comfyui", help="ComfyUI folder (default: the pinned host)")
    return ap.parse_args(argv)


def config_from_args(args, processes: int):
    """(Face0TrainConfig, the expanded preset) for parsed ``args``: the preset's values where no flag was given."""
    from facecond.py.train import face0_train as ft

    run = ft.expand_preset(args.preset, processes, steps=args.steps, batch=args.batch, accum=args.accum, lr=args.lr,
                           ema_decay=args.ema_decay, face_drop=args.face_drop, proj_hidden=args.proj_hidden,
                           proj_depth=args.proj_depth)
    cfg = ft.Face0TrainConfig(steps=run["steps"], batch=run["batch"], accum=run["accum"], lr=run["lr"],
                              warmup=args.warmup, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
                              ema_decay=run["ema_decay"], face_drop=run["face_drop"], mode=args.mode,
                              lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                              lora_blocks=tuple(args.lora_blocks.split(",")), seed=args.seed,
                              proj_hidden=run["proj_hidden"], proj_depth=run["proj_depth"])
    return cfg, run


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from accelerate import Accelerator

    acc = Accelerator(mixed_precision=args.mixed_precision, log_with="tensorboard", project_dir=args.out)
    logging.basicConfig(level=logging.INFO if acc.is_main_process else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # ComfyUI on this process's accelerator device (the CPU only when training on the CPU)
    host.import_comfy(Path(tempfile.mkdtemp(prefix="facecond-train-")), args.comfyui, cpu=acc.device.type == "cpu")
    host.load_pack(host.REPO, "facecond")
    from facecond.py.face0.projection import ProjectionInfo, load_projection, random_projection
    from facecond.py.train import face0_train as ft

    try:
        cfg, run = config_from_args(args, acc.num_processes)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    shards = sorted({p for s in args.shards for p in (glob.glob(s) or [s]) if os.path.isfile(p)})
    if not shards:
        raise SystemExit(f"face0_train: no shard files match {args.shards}")
    patcher, clip, vae, family = load_checkpoint(args.checkpoint)
    base = patcher.model
    width = int(base.model_config.unet_config["context_dim"])
    rank, world = acc.process_index, acc.num_processes
    stream = ft.sample_stream(shards, rank, world, cfg.seed)
    first = ft.collate([next(stream) for _ in range(cfg.batch)])
    if args.projection:
        proj = load_projection(args.projection)
        if proj.info.embedder != first["embedder"] or proj.info.context_dim != width:
            raise SystemExit(f"face0_train: {args.projection} is for {proj.info.embedder} / width "
                             f"{proj.info.context_dim}; the data has {first['embedder']} and the model width {width}")
    else:
        info = ProjectionInfo(embedder=first["embedder"], embed_dim=first["embeds"].shape[1], context_dim=width,
                              hidden=cfg.proj_hidden, depth=cfg.proj_depth, base_model=family,
                              extra={"trained_with": "scripts/face0_train.py", "preset": args.preset})
        proj = random_projection(info, seed=cfg.seed)
    model = ft.Face0Model(proj, base, cfg)
    params = model.trainable()
    opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = ft.EMA(params, cfg.ema_decay)
    state_dir = Path(args.out) / "state"
    step = 0
    if args.resume:
        found = sorted(state_dir.glob("step-*.safetensors")) if args.resume == "auto" else [Path(args.resume)]
        if found:
            step = int(ft.load_state(str(found[-1]), params, ema, opt)["step"])
            log.info("resumed from %s at step %d", found[-1], step)
    dmodel, opt = acc.prepare(model, opt)
    sigmas = base.model_sampling.sigmas.detach().cpu()
    stream = ft.sample_stream(shards, rank, world, cfg.seed, skip=step * cfg.accum * cfg.batch)
    cache: dict[str, tuple] = {}
    adm = ft.needs_adm(base)  # SDXL: the pooled CLIP-G output goes into y (ft.batch_adm)

    def encode_text(captions):
        """(contexts (B, 77, W), pooled (B, 1280) or None): ComfyUI's own encoding (CLIPTextEncode's: every
        encoder of the checkpoint at the layer ComfyUI uses, SDXL's CLIP-L and CLIP-G side by side), first chunk."""
        out = []
        for c in captions:
            if c not in cache:
                with torch.no_grad():  # frozen CLIP
                    if adm:
                        ctx, pooled = clip.encode_from_tokens(clip.tokenize(c), return_pooled=True)
                        enc = (ctx[:, :77].float().cpu(), pooled[:1].float().cpu())
                    else:  # SD1.x / SD2.x: the call made before SDXL support
                        enc = (clip.encode_from_tokens(clip.tokenize(c))[:, :77].float().cpu(), None)
                if len(cache) < args.text_cache:
                    cache[c] = enc
                out.append(enc)
            else:
                out.append(cache[c])
        ctx = torch.cat([o[0] for o in out]).to(acc.device)
        return ctx, (torch.cat([o[1] for o in out]).to(acc.device) if adm else None)

    def latents_of(batch):
        with torch.no_grad():
            lat = batch["latent"] if "latent" in batch else vae.encode(batch["image"]).float().cpu()  # frozen VAE
            return base.process_latent_in(lat).to(acc.device)

    def inputs(batch):
        """(x0, context, face embeddings, y) of a collated batch; y None except on SDXL."""
        lat = latents_of(batch)
        ctx, pooled = encode_text(batch["captions"])
        y = ft.batch_adm(base, batch, pooled, lat.shape[-1] * 8)  # target size: the stored square's side
        return lat, ctx, batch["embeds"].to(acc.device), y

    if adm:
        try:
            ft.batch_adm(base, first, torch.zeros(len(first["captions"]), 1280), 8)
        except ValueError as e:
            raise SystemExit(str(e)) from None

    def fixed_loss(batch, draws: int = 8) -> float:
        """Mean loss over the same ``draws`` (σ, ε) draws, no face dropout: comparable before/after training."""
        with torch.no_grad(), acc.autocast():
            lat, ctx, emb, y = inputs(batch)
            return sum(float(ft.face0_loss(dmodel, lat, ctx, emb, sigmas, ft.step_generator(cfg.seed, 10**12 + i),
                                           0.0, y)) for i in range(draws)) / draws

    summary = {"start_step": step, "fixed_loss_start": fixed_loss(first), "family": family, "mode": cfg.mode,
               "trainable_parameters": sum(p.numel() for p in params.values()), "processes": world,
               "preset": args.preset, "global_batch": run["global_batch"], "accum": cfg.accum,
               "ema_decay": cfg.ema_decay, "projection": {"hidden": proj.info.hidden, "depth": proj.info.depth,
                                                          "parameters": proj.info.parameters}}
    if acc.is_main_process:
        acc.init_trackers("face0", config={k: str(v) for k, v in vars(args).items()})
    losses, t0, seen = [], time.perf_counter(), 0
    while step < cfg.steps:
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else cfg.lr
        for g in opt.param_groups:
            g["lr"] = lr

        def micro_loss(micro: int, step: int = step) -> torch.Tensor:
            batch = ft.collate([next(stream) for _ in range(cfg.batch)])
            gen = ft.micro_generator(cfg.seed, step * cfg.accum + micro, rank, world)
            with acc.autocast():
                lat, ctx, emb, y = inputs(batch)
                return ft.face0_loss(dmodel, lat, ctx, emb, sigmas, gen, cfg.face_drop, y)

        total = ft.accumulate(micro_loss, cfg.accum, acc.backward, lambda: acc.no_sync(dmodel))
        if cfg.grad_clip > 0:
            acc.clip_grad_norm_(list(params.values()), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        ema.update(params, step)
        seen += cfg.batch * cfg.accum * world
        losses.append(total)
        if step % args.log_every == 0 or step == cfg.steps:
            rate = seen / (time.perf_counter() - t0)
            acc.log({"loss": total, "lr": lr, "samples_per_s": rate}, step=step)
            log.info("step %d/%d loss %.5f lr %.2e %.1f samples/s", step, cfg.steps, total, lr, rate)
        if step % args.save_every == 0 or step == cfg.steps:
            acc.wait_for_everyone()
            if acc.is_main_process:
                state_dir.mkdir(parents=True, exist_ok=True)
                ft.save_state(str(state_dir / f"step-{step:08d}.safetensors"), params, ema, opt.optimizer, step,
                              cfg, {"checkpoint": os.path.basename(args.checkpoint), "processes": world})
    summary.update(end_step=step, losses=losses, fixed_loss_end=fixed_loss(first),
                   samples_per_s=seen / max(time.perf_counter() - t0, 1e-9))
    # every process records a fingerprint of its parameters: DDP keeps them identical (checked by the tests)
    (Path(args.out) / f"params-rank{rank}.json").write_text(json.dumps(
        {n: float(p.detach().double().sum()) for n, p in params.items()}))
    acc.wait_for_everyone()
    acc.end_training()
    if acc.is_main_process:
        export(args, model, params, ema, patcher, clip, vae, summary)
    return 0


def export(args, model, params, ema, patcher, clip, vae, summary) -> None:
    from safetensors.torch import save_file

    from facecond.py.face0.projection import save_projection

    out = Path(args.out)
    if args.export == "ema":
        ema.copy_to(params)
    proj = model.proj.float().cpu().eval()
    save_projection(proj, out / "face0_projection.safetensors")
    files = {"projection": str(out / "face0_projection.safetensors")}
    if model.lora is not None:
        path = out / "face0_unet_lora.safetensors"
        save_file(model.lora.comfy_state_dict(), str(path), metadata={"facecond.kind": "face0_unet_lora"})
        files["lora"] = str(path)
    else:
        import comfy.sd

        path = out / "face0_checkpoint.safetensors"
        comfy.sd.save_checkpoint(str(path), patcher, clip, vae, metadata={"facecond.kind": "face0_checkpoint"})
        files["checkpoint"] = str(path)
    summary["files"] = files
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    for f in files.values():
        print(f)


if __name__ == "__main__":
    sys.exit(main())
