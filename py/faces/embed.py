"""Face recognisers: FaceNet Inception-ResNet-V1 (torch) and insightface-format ONNX recognisers.

Both take the crops a ``Faces`` carries ((N, S, S, 3) float in [0, 1]) and return (N, D) float32.
``load_facenet`` / ``load_onnx_recogniser`` build a model from a file; the nodes keep the built models in one
cache under ComfyUI's model management (``nodes/model_cache.py``). The model id carries a short sha256 of the file.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..weights.manifest import load_state_dict, sha256_file
from .onnx_pack import make_session, recogniser_normalisation

log = logging.getLogger("facecond")

FACENET_LAYERS = ("bottleneck_512", "pooled_1792")
_MODEL_IDS = {"bottleneck_512": "facenet-vggface2/bottleneck", "pooled_1792": "facenet-vggface2/pooled"}
BATCH = 32  # faces per forward pass: bounded memory, near-full CPU/GPU throughput


class FaceNet:
    """facenet-pytorch's InceptionResnetV1 with VGGFace2 weights from a file (never downloaded).

    Layers: ``bottleneck_512``: last_linear + last_bn, before the L2 normalisation facenet-pytorch applies;
    ``pooled_1792``: the average-pooled features before last_linear. Input: (x * 255 - 127.5) / 128
    (facenet-pytorch's fixed_image_standardization, what its MTCNN hands the model), 160x160 RGB.
    """

    def __init__(self, weights: str | os.PathLike):
        from facenet_pytorch.models.inception_resnet_v1 import InceptionResnetV1

        sd = load_state_dict(weights)
        sd = {k: v for k, v in sd.items() if not k.startswith("logits.")}  # the 8631-way VGGFace2 classifier
        net = InceptionResnetV1(pretrained=None, classify=False)
        missing, unexpected = net.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ValueError(f"FaceNet: {weights} is not an Inception-ResNet-V1 state dict "
                             f"(missing {missing[:3]}..., unexpected {unexpected[:3]}...)")
        self.net = net.eval()
        self.path = Path(weights)

    @staticmethod
    def model_id(layer: str) -> str:
        return _MODEL_IDS[layer]

    @staticmethod
    def dim(layer: str) -> int:
        return 512 if layer == "bottleneck_512" else 1792

    def _features(self, x: torch.Tensor, layer: str) -> torch.Tensor:
        n = self.net
        for name in ("conv2d_1a", "conv2d_2a", "conv2d_2b", "maxpool_3a", "conv2d_3b", "conv2d_4a", "conv2d_4b",
                     "repeat_1", "mixed_6a", "repeat_2", "mixed_7a", "repeat_3", "block8", "avgpool_1a"):
            x = getattr(n, name)(x)
        x = x.flatten(1)  # (N, 1792)
        if layer == "pooled_1792":
            return x
        return n.last_bn(n.last_linear(x))  # (N, 512); eval mode: dropout is a no-op

    @torch.inference_mode()
    def embed(self, crops: torch.Tensor, layer: str = "bottleneck_512", device: torch.device | None = None,
              progress=None) -> torch.Tensor:
        if layer not in FACENET_LAYERS:
            raise ValueError(f"FaceNet: unknown layer {layer!r}; one of {FACENET_LAYERS}")
        device = device or next(self.net.parameters()).device
        dtype = next(self.net.parameters()).dtype
        out = []
        for i in range(0, crops.shape[0], BATCH):
            x = crops[i:i + BATCH].permute(0, 3, 1, 2).to(device, dtype)  # (n, 3, 160, 160)
            if x.shape[-1] != 160 or x.shape[-2] != 160:
                x = F.interpolate(x, size=(160, 160), mode="bilinear", antialias=True, align_corners=False)
            out.append(self._features((x * 255.0 - 127.5) / 128.0, layer).float().cpu())
            if progress is not None:
                progress(min(i + BATCH, crops.shape[0]))
        return torch.cat(out) if out else torch.zeros(0, self.dim(layer))


class OnnxRecogniser:
    """An insightface-format recogniser (ArcFace, CosFace, MobileFaceNet ...) run with onnxruntime.

    Pre-processing follows insightface's ArcFaceONNX.get_feat: RGB, (x - mean) / std with mean/std
    read from the graph (``recogniser_normalisation``), input size from the model (112 for all packs).
    Any output width. Models with a fixed batch of 1 are run face by face, others in batches.
    """

    def __init__(self, path: str | os.PathLike, session=None):
        self.path = Path(path)
        self.session = session if session is not None else make_session(self.path)
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.size = int(inp.shape[2]) if isinstance(inp.shape[2], int) else 112
        self.fixed_batch = isinstance(inp.shape[0], int)
        self.mean, self.std = recogniser_normalisation(self.path)
        width = self.session.get_outputs()[0].shape[-1]
        self.width = int(width) if isinstance(width, int) else None
        self.model_id = f"insightface/{self.path.name}@{sha256_file(self.path)[:8]}"

    def embed(self, crops: torch.Tensor, progress=None, exact: bool = False) -> torch.Tensor:
        """exact: the crops are uint8 / 255 (preprocess="insightface"): the blob is built as insightface's
        ArcFaceONNX.get_feat builds it (cv2.dnn.blobFromImages: (u - mean) * (1 / std) in float32 on the
        integer pixels), bit for bit."""
        x = crops.permute(0, 3, 1, 2).float()
        if x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        if exact:
            u = (x * 255.0).round().numpy().astype(np.float32)
            blob = ((u - np.float32(self.mean)) * np.float32(1.0 / self.std)).astype(np.float32)
        else:
            blob = ((x * 255.0 - self.mean) / self.std).numpy().astype(np.float32)
        step = 1 if self.fixed_batch else BATCH
        out = []
        for i in range(0, blob.shape[0], step):
            out.append(self.session.run(None, {self.input_name: blob[i:i + step]})[0])
            if progress is not None:
                progress(min(i + step, blob.shape[0]))
        if not out:
            return torch.zeros(0, self.width or 0)
        return torch.from_numpy(np.concatenate(out).astype(np.float32)).reshape(blob.shape[0], -1)


def load_facenet(path: str | os.PathLike) -> FaceNet:
    """A FaceNet from a file (no cache here: the nodes keep models in ComfyUI's model management,
    ``nodes/model_cache.py``)."""
    return FaceNet(path)


def load_onnx_recogniser(path: str | os.PathLike, session=None) -> OnnxRecogniser:
    return OnnxRecogniser(path, session)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, p=2, dim=1, eps=1e-12)
