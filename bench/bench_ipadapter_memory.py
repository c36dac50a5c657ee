"""Benchmark: bytes an IP-Adapter keeps resident once loaded, today's float32 copy against the model dtype.

Writes random-weight files at the published sizes (float16 tensors, as the published files hold): the SDXL plus
adapter (ip-adapter-plus_sdxl_vit-h: a 4-layer, 20-head Resampler, 16 tokens of 2048, W'_k/W'_v on SDXL's 70
cross-attentions, ~0.85 GB) and the SDXL FaceID Plus v2 adapter (ip-adapter-faceid-plusv2_sdxl: a 4-layer, 32-head
FacePerceiverResampler and a rank-128 LoRA on SDXL's 140 attentions, ~1.5 GB). Each is loaded three ways, in one run:
float32 (what the pack did before: every tensor cast to float32), through LoadIPAdapter (the model cache, weights in
the dtype ComfyUI picks for the diffusion model on this machine: ``model_management.unet_dtype``; float32 on most
CPUs), and in float16 (what ``unet_dtype`` picks on a CUDA GPU). Printed per case: the adapter's tensor bytes (each
storage once: projection, W'_k/W'_v, LoRA) and the ratio to float32. (The process's resident-set growth is not
printed: in one process glibc reuses the arenas the file writing freed, so it reads near zero or negative.)

    .host/venv/bin/python -P bench/bench_ipadapter_memory.py [--only plus_sdxl] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from facecond_dev.bench import setup  # noqa: E402

SDXL_LAYERS = [*[640] * 4, *[1280] * 20, *[1280] * 30, *[640] * 6, *[1280] * 10]
FILES = {  # name -> (file name, random_state_dict kind and options at the published sizes)
    "plus_sdxl": ("ip-adapter-plus_sdxl_vit-h.safetensors",
                  dict(kind="plus", input_dim=1280, cross_dim=2048, tokens=16, depth=4, inner=1280, dim=1280)),
    "faceid_plusv2_sdxl": ("ip-adapter-faceid-plusv2_sdxl.safetensors",
                           dict(kind="faceid_plus", input_dim=512, cross_dim=2048, tokens=4, depth=4, inner=2048,
                                clip_dim=1280, lora_rank=128)),
}


def write(folder: Path, name: str, opts: dict) -> Path:
    import torch
    from safetensors.torch import save_file

    from facecond_dev.random_weights import random_state_dict

    torch.manual_seed(0)
    kw = dict(opts)
    sd = random_state_dict(kw.pop("kind"), kw.pop("input_dim"), SDXL_LAYERS, **kw)
    sd = {k: v.half() for k, v in sd.items()}
    path = folder / name
    save_file(sd, str(path))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=sorted(FILES))
    ap.add_argument("--json")
    args = ap.parse_args()
    base, _ = setup(1, load_checkpoint=False)
    import comfy.model_management as mm
    import folder_paths
    import torch

    from facecond.nodes import model_cache
    from facecond.nodes.ipadapter import adapter as node
    from facecond.py.ipadapter import adapter as ipa

    folder = Path(folder_paths.get_folder_paths("ipadapter")[0])
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"ComfyUI model dtype on this machine ({mm.get_torch_device()}): {node.model_dtype()}")
    print(f"{'adapter':<42} {'dtype':<26} {'tensor bytes':>14} {'ratio':>6}")
    for key, (fname, opts) in FILES.items():
        if args.only and key != args.only:
            continue
        path = write(folder, fname, opts)
        gc.collect()
        figures = {}
        for label, load in (("float32 (before)", lambda p: ipa.load(p, torch.float32)),
                            (f"LoadIPAdapter ({node.model_dtype()})".replace("torch.", ""),
                             lambda p: node.LoadIPAdapter().load(p.name)[0]),
                            ("float16 (GPU unet dtype)", lambda p: ipa.load(p, torch.float16))):
            a = load(path)
            held = a.resident_bytes()
            figures[label] = held
            ratio = held / figures["float32 (before)"]
            print(f"{fname:<42} {label:<26} {held:>14,} {ratio:>6.2f}")
            rows.append({"file": fname, "dtype": label, "tensor_bytes": held, "ratio": ratio})
            del a
            model_cache.clear()  # the LoadIPAdapter case: the cache held it
            gc.collect()
        path.unlink()
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    del base


if __name__ == "__main__":
    main()
