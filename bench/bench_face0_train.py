"""Benchmark: Face0 training samples/s and peak memory at a fixed tiny configuration, and data preparation
images/s, each next to a plain forward-pass baseline measured in the same run.

Tiny SD1.5 checkpoint on the CPU, one torch thread, 64x64 latents (8x8), batch 2, LoRA rank 4 and full
fine-tune. Training: forward + backward + AdamW of projection + U-Net vs the U-Net forward alone (no grad).
Preparation: MTCNN + crop + embedding (insightface test recogniser) per image vs the recogniser forward alone.
Figures are the best of ``--repeats`` (CPU time of this process, so other users of the machine do not count;
``--device cuda``: synchronised wall time on the GPU and the peak VRAM of each case). The projection is the small
preset's (width 768) and, in LoRA mode, also the paper preset's (width 1536, ~10M parameters at D = 512).

    .host/venv/bin/python -P bench/bench_face0_train.py [--repeats 5] [--device cpu|cuda] [--json out.json]
"""

from __future__ import annotations

# ruff: noqa: B023  (the closures are timed within their own loop iteration)
import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from facecond_dev import host  # noqa: E402
from facecond_dev.bench import PeakMemory, Report, add_device_flags, best_cpu_time, best_time  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    add_device_flags(ap)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    dev = args.device
    host.import_comfy(Path(tempfile.mkdtemp(prefix="facecond-bench-")), cpu=dev == "cpu")
    host.load_pack(host.REPO, "facecond")
    import comfy.sd

    from facecond.py.face0.projection import PRESETS, ProjectionInfo, random_projection
    from facecond.py.faces import detect, embed
    from facecond.py.train import face0_data as fd
    from facecond.py.train import face0_train as ft
    from facecond.py.weights import manifest as weights

    ckpt = str(host.tiny_checkpoint_path())
    b = 2
    x0, ctx, emb = (t.to(dev) for t in (torch.randn(b, 4, 8, 8), torch.randn(b, 77, 768), torch.randn(b, 128)))
    report = Report("face0_train", dev)
    for mode, proj_preset in (("lora", "small"), ("lora", "paper"), ("full", "small")):
        base = comfy.sd.load_checkpoint_guess_config(ckpt, output_clip=False, output_vae=False,
                                                     model_options={"dtype": torch.float32})[0].model
        info = ProjectionInfo("bench", 128, **PRESETS[proj_preset])
        model = ft.Face0Model(random_projection(info, 0), base, ft.Face0TrainConfig(
            mode=mode, lora_rank=4, batch=b)).to(dev)
        params = model.trainable()
        opt = torch.optim.AdamW(list(params.values()), lr=1e-4)
        sig = base.model_sampling.sigmas
        step = [0]

        def train_step():
            loss = ft.face0_loss(model, x0, ctx, emb, sig, ft.step_generator(0, step[0]), 0.1)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            step[0] += 1

        def forward():
            with torch.no_grad():
                base.apply_model(x0 + sig[500], sig[500].expand(b), c_crossattn=ctx)

        train_step()
        with PeakMemory(dev) as mem:
            t_train = best_time(train_step, args.repeats, dev)
        t_fwd = best_time(forward, args.repeats, dev)
        peak = mem.mb  # CPU: the process's peak RSS so far (as before); CUDA: this case's peak VRAM
        n = sum(p.numel() for p in params.values())
        name = f"train[{mode}, {proj_preset} projection {info.parameters / 1e6:.2f}M]"
        print(f"{name} {b / t_train:7.2f} samples/s ({n / 1e6:.1f}M trainable) | forward baseline "
              f"{b / t_fwd:7.2f} samples/s | ratio {t_train / t_fwd:.2f}x | peak {'RSS' if dev == 'cpu' else 'VRAM'} "
              f"{peak:.0f} MB")
        report.add(name, t_train / b, unit="sample", ratio=t_train / t_fwd, peak_mb=peak,
                   note=f"{b / t_train:.2f} samples/s; ratio: to a no-grad U-Net forward")
    report.write(args.json, batch=b, repeats=args.repeats)
    data = host.shared_data()
    if data is None or dev != "cpu":
        print("prep: ../shared/data absent, skipped" if data is None else "prep: CPU only (see bench_faces.py)")
        return
    mtcnn = detect.MTCNN(*(weights.package_file(weights.get_entry(f"mtcnn_{n}")) for n in ("pnet", "rnet", "onet")))
    rec = embed.load_onnx_recogniser(data / "models/insightface_testpack/mobilefacenet_128.onnx")
    fm = fd.FaceModel(mtcnn, lambda faces: rec.embed(faces.crops_arcface), rec.model_id, True)
    img = fd.decode_image((data / "faces/obama/obama.jpg").read_bytes())
    cfg = fd.PrepConfig(512, detect_max_side=1024)
    crops = torch.rand(1, 112, 112, 3)
    t_prep = best_cpu_time(lambda: fd.encode_sample("0", img, "c", *fd.face_of(img, fm, cfg), fm, "x", cfg),
                           args.repeats)
    t_rec = best_cpu_time(lambda: rec.embed(crops), args.repeats)
    print(f"prep {1 / t_prep:7.2f} images/s ({img.size[0]}x{img.size[1]}: detect+crop+embed+jpeg) | recogniser "
          f"forward baseline {1 / t_rec:7.2f} images/s")


if __name__ == "__main__":
    main()
