"""FID and Inception Score with torch-fidelity's InceptionV3 (the TF-ported network every FID table uses).

torch-fidelity (Obukhov et al., https://github.com/toshas/torch-fidelity) is an optional dependency
(``pip install torch-fidelity``, or the pack's ``eval`` extra). Its weights file
``weights-inception-2015-12-05-6726825d.pth`` is either a file the user passes, or torch-fidelity's own download
into the torch hub cache; offline without the file the error says where to put it.

FID: Heusel et al. 2017 (arXiv 1706.08500) on the 2048-d pool features; IS: Salimans et al. 2016
(arXiv 1606.03498) on the unbiased logits, with the standard marginal p(y) and Kazistova et al.'s uniform
p(y) (``metrics.inception_score``).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from .metrics import frechet_distance, inception_score

log = logging.getLogger("facecond")

WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
INSTALL_HINT = "FID/IS need torch-fidelity: pip install torch-fidelity (or pip install 'facecond[eval]')"


def _import_fidelity():
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
    except ImportError as e:
        raise RuntimeError(INSTALL_HINT) from e
    return FeatureExtractorInceptionV3, URL_INCEPTION_V3


def hub_cache_file() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_NAME


def load_inception(weights: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
    """torch-fidelity's InceptionV3 feature extractor (2048-d pool features and unbiased logits).

    ``weights``: the .pth file; None: torch-fidelity's cache (downloaded there once when online)."""
    extractor, url = _import_fidelity()
    path = Path(weights) if weights else None
    if path is not None and not path.is_file():
        raise FileNotFoundError(f"Inception weights {path} not found; download {url} and pass its path.")
    if path is None and hub_cache_file().is_file():
        path = hub_cache_file()
    if path is None and os.environ.get("FACECOND_OFFLINE") == "1":
        raise RuntimeError(f"FID/IS: no Inception weights and FACECOND_OFFLINE=1. Download {url} and pass its path "
                           f"(--inception-weights), or put it at {hub_cache_file()}.")
    tmp = None
    if path is not None:
        # torch-fidelity reads the file with torch.load(weights_only=False), which would run any pickled code:
        # read it here without unpickling code (safetensors, or torch.load(weights_only=True)), check it, and hand
        # torch-fidelity a private file holding only those tensors (torch.save of a plain dict).
        tmp = tempfile.NamedTemporaryFile(suffix=".pth", delete=False)
        torch.save(read_inception_state_dict(path, url), tmp)
        tmp.close()
        path = Path(tmp.name)
    try:
        net = extractor("inception-v3-compat", ["2048", "logits_unbiased"],
                        feature_extractor_weights_path=str(path) if path else None)
    except OSError as e:  # urllib's URLError is an OSError: offline or blocked
        raise RuntimeError(f"FID/IS: could not download the Inception weights ({e}). Download {url} on a machine "
                           f"with internet and pass its path (--inception-weights), or put it at "
                           f"{hub_cache_file()}.") from None
    finally:
        if tmp is not None:
            os.unlink(tmp.name)
    return net.eval().to(device)


# A few of torch-fidelity's InceptionV3 keys and shapes: enough to tell its weights from any other file.
_INCEPTION_KEYS = {"Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "fc.weight": (1008, 2048), "fc.bias": (1008,)}


def read_inception_state_dict(path: str | os.PathLike, url: str = "") -> dict[str, torch.Tensor]:
    """torch-fidelity's Inception weights (``.pth`` or ``.safetensors``) read without unpickling code; a file that
    is not them gets one message saying what it is and where the right one comes from."""
    path = Path(path)
    fix = f"pass torch-fidelity's {WEIGHTS_NAME}" + (f" (from {url})" if url else "")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip, safetensors header errors: all "not a weights file"
        raise ValueError(f"--inception-weights {path}: not a weights file that loads without running code "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); {fix}.") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"--inception-weights {path}: holds a {type(sd).__name__}, not a state dict of tensors; "
                         f"{fix}.")
    wrong = {k: tuple(sd[k].shape) if k in sd else None for k, shape in _INCEPTION_KEYS.items()
             if k not in sd or tuple(sd[k].shape) != shape}
    if wrong:
        raise ValueError(f"--inception-weights {path}: a state dict, but not torch-fidelity's InceptionV3 (keys/shapes "
                         f"{wrong} instead of {_INCEPTION_KEYS}); {fix}.")
    return sd


@torch.no_grad()
def inception_features(net, images01: torch.Tensor, batch: int = 32) -> tuple[np.ndarray, torch.Tensor]:
    """(B, H, W, 3) in [0, 1] -> ((B, 2048) float64 pool features, (B, 1008) unbiased logits).
    torch-fidelity's network takes uint8 (B, 3, H, W) and resizes to 299 itself."""
    device = next(net.parameters()).device
    feats, logits = [], []
    for i in range(0, images01.shape[0], batch):
        x = (images01[i:i + batch].clamp(0, 1) * 255.0).round().to(torch.uint8).permute(0, 3, 1, 2).to(device)
        f, lg = net(x)
        feats.append(f.double().cpu())
        logits.append(lg.double().cpu())
    return torch.cat(feats).numpy(), torch.cat(logits)


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (rows: samples) of the features."""
    if features.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {features.shape[0]}")
    return features.mean(0), np.cov(features, rowvar=False)


def fid(features_real: np.ndarray, features_gen: np.ndarray) -> float:
    return frechet_distance(*statistics(features_real), *statistics(features_gen))


def inception_scores(logits: torch.Tensor, splits: int = 1) -> dict[str, float]:
    """Both IS variants, named: ``is_marginal`` (standard) and ``is_uniform`` (Kazistova et al.'s eq. 5)."""
    splits = max(1, min(splits, logits.shape[0]))
    m, ms = inception_score(logits, "marginal", splits)
    u, us = inception_score(logits, "uniform", splits)
    return {"is_marginal": m, "is_marginal_std": ms, "is_uniform": u, "is_uniform_std": us}
