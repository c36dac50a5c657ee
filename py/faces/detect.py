"""Face detectors: MTCNN (facenet-pytorch's networks) and SCRFD (insightface ONNX, our own decoding).

Both return, per image, a ``Detections`` of boxes (K, 4) x1 y1 x2 y2, scores (K,) and 5 landmarks
(K, 5, 2) in pixels (left eye, right eye, nose, left and right mouth corner).
Images come in as numpy float32 (H, W, 3) RGB in 0..255 (MTCNN's and SCRFD's native range).
``preprocess`` picks SCRFD's input resize: "facecond" (float image, INTER_AREA when shrinking) or
"insightface" (insightface's FaceAnalysis exactly: the image as uint8, INTER_LINEAR); MTCNN ignores it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from ..weights.manifest import load_state_dict

log = logging.getLogger("facecond")


PREPROCESS_MODES = ("facecond", "insightface")


def to_uint8(image: np.ndarray) -> np.ndarray:
    """A float 0..255 image as the uint8 image it came from (rounded, clipped); uint8 passes unchanged.
    ComfyUI's LoadImage gives x = u / 255, so round(x * 255) gives back the file's pixels exactly."""
    if image.dtype == np.uint8:
        return image
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


@dataclass
class Detections:
    boxes: np.ndarray  # (K, 4) float32
    scores: np.ndarray  # (K,) float32
    landmarks: np.ndarray  # (K, 5, 2) float32

    @staticmethod
    def empty() -> Detections:
        return Detections(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), np.zeros((0, 5, 2), np.float32))

    def __len__(self) -> int:
        return len(self.scores)

    def keep(self, mask) -> Detections:
        return Detections(self.boxes[mask], self.scores[mask], self.landmarks[mask])


def nms(boxes: np.ndarray, scores: np.ndarray, thresh: float, stable: bool = False) -> np.ndarray:
    """Greedy non-maximum suppression (highest score first); indices kept. Same rule as insightface's SCRFD.

    stable: equal scores keep their order (insightface 2.x's ``argsort(-scores, kind="stable")``)."""
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)  # insightface's +1 pixel convention
    order = np.argsort(-scores, kind="stable") if stable else scores.argsort()[::-1]
    keep = []
    while order.size > 0:
        i = order[0]
        keep.append(i)
        xx1, yy1 = np.maximum(x1[i], x1[order[1:]]), np.maximum(y1[i], y1[order[1:]])
        xx2, yy2 = np.minimum(x2[i], x2[order[1:]]), np.minimum(y2[i], y2[order[1:]])
        inter = np.maximum(0.0, xx2 - xx1 + 1) * np.maximum(0.0, yy2 - yy1 + 1)
        iou = inter / (areas[i] + areas[order[1:]] - inter)
        order = order[1:][iou <= thresh]
    return np.asarray(keep, np.int64)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) IoU of x1 y1 x2 y2 boxes (continuous coordinates)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter + 1e-9)


class MTCNN:
    """MTCNN (Zhang et al. 2016) with facenet-pytorch's P/R/O-nets; weights from the given files.

    The state dicts are read with ``torch.load(weights_only=True)``; facenet-pytorch never downloads here.
    thresholds/factor: facenet-pytorch's defaults (0.6, 0.7, 0.7) and 0.709.
    """

    name = "mtcnn"

    def __init__(self, pnet: str | os.PathLike, rnet: str | os.PathLike, onet: str | os.PathLike, *,
                 device: torch.device | str = "cpu", thresholds=(0.6, 0.7, 0.7), factor: float = 0.709):
        from facenet_pytorch.models.mtcnn import ONet, PNet, RNet

        nets = []
        for cls, path in ((PNet, pnet), (RNet, rnet), (ONet, onet)):
            net = cls(pretrained=False)
            net.load_state_dict(load_state_dict(path))
            nets.append(net.eval())
        self.nets = torch.nn.ModuleList(nets).to(device)  # one module: a model manager moves and frees it whole
        self.thresholds = list(thresholds)
        self.factor = factor

    @property
    def device(self) -> torch.device:
        """Where the nets are now (a model manager may have moved them since)."""
        return next(self.nets.parameters()).device

    @torch.no_grad()
    def _detect(self, images: np.ndarray, min_size: int) -> list[Detections]:
        from facenet_pytorch.models.utils.detect_face import detect_face

        b, h, w = images.shape[:3]
        if min(h, w) < max(min_size, 12):  # facenet-pytorch's pyramid would be empty (and crash)
            return [Detections.empty() for _ in range(b)]
        x = torch.from_numpy(np.ascontiguousarray(images, np.float32)).to(self.device)
        boxes, points = detect_face(x, min_size, *self.nets, self.thresholds, self.factor, self.device)
        out = []
        for bx, pt in zip(boxes, points):
            b5 = np.asarray(bx, np.float32).reshape(-1, 5)  # numpy 2: may be an object array; cast
            out.append(Detections(b5[:, :4].copy(), b5[:, 4].copy(), np.asarray(pt, np.float32).reshape(-1, 5, 2)))
        return out

    def detect(self, images: np.ndarray, min_size: int, preprocess: str = "facecond") -> list[Detections]:
        """images: (B, H, W, 3) float32 RGB 0..255, one size. One batched MTCNN pass for the whole batch.
        ``preprocess`` only concerns SCRFD (MTCNN has no insightface counterpart); accepted and ignored.

        facenet-pytorch cuts a box that crosses the image border at the border and stretches the cut to
        the R/O-net input (the original MTCNN zero-pads it), which skews landmarks of faces that fill the
        frame by 15-20 px on 150 px chips. Images with such a box are run again zero-padded by a quarter
        of their size, which brings the landmarks back within ~2-5 px of SCRFD's.
        """
        dets = self._detect(images, min_size)
        h, w = images.shape[1:3]
        redo = []
        for i, d in enumerate(dets):
            if len(d):
                side = (d.boxes[:, 2:] - d.boxes[:, :2]).max(1)
                over = np.maximum.reduce([-d.boxes[:, 0], -d.boxes[:, 1], d.boxes[:, 2] - w, d.boxes[:, 3] - h])
                if (over > 0.05 * side).any():
                    redo.append(i)
        if redo:
            p = max(h, w) // 4
            padded = np.zeros((len(redo), h + 2 * p, w + 2 * p, 3), np.float32)
            padded[:, p:p + h, p:p + w] = images[redo]
            for i, d in zip(redo, self._detect(padded, min_size)):
                d.boxes -= p
                d.landmarks -= p
                dets[i] = d
        return dets


def distance2bbox(points: np.ndarray, distance: np.ndarray) -> np.ndarray:
    """Anchor centres + (left, top, right, bottom) distances -> x1 y1 x2 y2.

    SCRFD decoding (Guo et al., "Sample and Computation Redistribution for Efficient Face Detection",
    2021; insightface `detection/scrfd`, `python-package/insightface/model_zoo/scrfd.py`).
    """
    return np.stack([points[:, 0] - distance[:, 0], points[:, 1] - distance[:, 1],
                     points[:, 0] + distance[:, 2], points[:, 1] + distance[:, 3]], axis=-1)


def distance2kps(points: np.ndarray, distance: np.ndarray) -> np.ndarray:
    """Anchor centres + per-keypoint (dx, dy) offsets -> (K, 5, 2) keypoints (SCRFD, as above)."""
    d = distance.reshape(distance.shape[0], 5, 2)
    return points[:, None, :] + d


class SCRFD:
    """SCRFD detector from an insightface pack, run with onnxruntime; our own pre/post-processing.

    Mirrors insightface's SCRFD.detect: letterbox to input_size at the top-left corner, (x - 127.5) / 128
    RGB, three feature strides 8/16/32 with 2 anchors per location when keypoints are present,
    score >= score_thresh, distances scaled by stride, NMS at 0.4.
    """

    def __init__(self, session, name: str = "scrfd", input_size: int = 640, score_thresh: float = 0.5,
                 nms_thresh: float = 0.4):
        self.session = session
        self.name = name
        self.input_name = session.get_inputs()[0].name
        self.output_names = [o.name for o in session.get_outputs()]
        n_out = len(self.output_names)
        if n_out not in (6, 9, 10, 15):
            raise ValueError(f"SCRFD: {n_out} outputs; expected 6/9 (strides 8,16,32) or 10/15 (5 strides)")
        self.fmc = 3 if n_out in (6, 9) else 5
        self.strides = [8, 16, 32] if self.fmc == 3 else [8, 16, 32, 64, 128]
        self.num_anchors = 2 if self.fmc == 3 else 1
        self.use_kps = n_out in (9, 15)
        if not self.use_kps:
            raise ValueError("SCRFD: this detector has no keypoint outputs (a *_bnkps model is needed for alignment)")
        shape = session.get_inputs()[0].shape
        fixed = shape[2:4] if all(isinstance(s, int) for s in shape[2:4]) else None
        self.input_size = (int(fixed[1]), int(fixed[0])) if fixed else (input_size, input_size)  # (w, h)
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self._centers: dict[tuple[int, int, int], np.ndarray] = {}

    def _anchor_centers(self, h: int, w: int, stride: int) -> np.ndarray:
        key = (h, w, stride)
        if key not in self._centers:
            ys, xs = np.mgrid[:h, :w]
            c = (np.stack([xs, ys], axis=-1).astype(np.float32) * stride).reshape(-1, 2)
            self._centers[key] = np.repeat(c, self.num_anchors, axis=0)  # anchors per location are adjacent
        return self._centers[key]

    def _letterbox(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        """facecond: the float image resized (INTER_AREA when shrinking: no aliasing) into the top-left corner."""
        import cv2
        h, w = image.shape[:2]
        in_w, in_h = self.input_size
        if h / w > in_h / in_w:
            new_h, new_w = in_h, max(1, int(in_h * w / h))
        else:
            new_w, new_h = in_w, max(1, int(in_w * h / w))
        scale = new_h / h
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        canvas = np.zeros((in_h, in_w, 3), np.float32)
        canvas[:new_h, :new_w] = cv2.resize(image, (new_w, new_h), interpolation=interp)
        return canvas, scale

    def _letterbox_insightface(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        """insightface's SCRFD.detect step by step (python-package ``model_zoo/scrfd.py``, 0.7.3 and 2.x): the
        image as uint8, its new size by insightface's float rule, ``cv2.resize`` with the default
        INTER_LINEAR (also when shrinking), pasted into a black uint8 canvas; det_scale = new_h / h."""
        import cv2
        img = to_uint8(image)
        in_w, in_h = self.input_size
        im_ratio = float(img.shape[0]) / img.shape[1]
        if im_ratio > float(in_h) / in_w:
            new_h, new_w = in_h, max(1, int(in_h / im_ratio))  # max(1, ...): a 1-px sliver, where insightface fails
        else:
            new_w, new_h = in_w, max(1, int(in_w * im_ratio))
        canvas = np.zeros((in_h, in_w, 3), np.uint8)
        canvas[:new_h, :new_w] = cv2.resize(img, (new_w, new_h))
        return canvas.astype(np.float32), float(new_h) / img.shape[0]

    def _run(self, image: np.ndarray, preprocess: str = "facecond") -> Detections:
        exact = preprocess == "insightface"
        canvas, scale = (self._letterbox_insightface if exact else self._letterbox)(image)
        in_w, in_h = self.input_size
        # (x - 127.5) / 128 on RGB: insightface's blobFromImage(1/128, mean 127.5, swapRB) of its BGR input
        blob = ((canvas - 127.5) / 128.0).transpose(2, 0, 1)[None]
        outs = self.session.run(self.output_names, {self.input_name: np.ascontiguousarray(blob, np.float32)})
        boxes, scores, kps = [], [], []
        for i, stride in enumerate(self.strides):
            sc = outs[i].reshape(-1)
            bb = outs[i + self.fmc].reshape(-1, 4) * stride
            kp = outs[i + 2 * self.fmc].reshape(-1, 10) * stride
            centers = self._anchor_centers(in_h // stride, in_w // stride, stride)
            pos = np.where(sc >= self.score_thresh)[0]
            boxes.append(distance2bbox(centers[pos], bb[pos]))
            kps.append(distance2kps(centers[pos], kp[pos]))
            scores.append(sc[pos])
        boxes = np.concatenate(boxes) / scale
        kps = np.concatenate(kps) / scale
        scores = np.concatenate(scores)
        keep = nms(boxes, scores, self.nms_thresh, stable=exact)  # insightface 2.x: a stable sort by score
        return Detections(boxes[keep].astype(np.float32), scores[keep].astype(np.float32),
                          kps[keep].astype(np.float32))

    def detect_one(self, image: np.ndarray, min_size: int = 0, preprocess: str = "facecond") -> Detections:
        """image: (H, W, 3) float32 RGB 0..255; preprocess: "facecond" or "insightface" (module docstring).

        A face that fills the whole frame (a tight face chip) is larger than SCRFD's biggest anchors
        at 640 px and goes unseen; when nothing is found, a second pass pads the image by half its
        size on every side (black, like the letterbox) so such faces come back into range.
        """
        if preprocess not in PREPROCESS_MODES:
            raise ValueError(f"SCRFD: unknown preprocess {preprocess!r}; one of {PREPROCESS_MODES}")
        det = self._run(image, preprocess)
        if len(det):
            return det
        h, w = image.shape[:2]
        p = max(h, w) // 2
        padded = np.zeros((h + 2 * p, w + 2 * p, 3), np.float32)
        padded[p:p + h, p:p + w] = image
        det = self._run(padded, preprocess)
        det.boxes -= p
        det.landmarks -= p
        return det

    def detect(self, images: np.ndarray, min_size: int, preprocess: str = "facecond") -> list[Detections]:
        return [self.detect_one(img, min_size, preprocess) for img in images]


def filter_min_size(det: Detections, min_size: int) -> Detections:
    """Keep faces whose box is at least min_size pixels on its longer side."""
    if not len(det):
        return det
    wh = det.boxes[:, 2:] - det.boxes[:, :2]
    return det.keep(wh.max(1) >= min_size)


def select(det: Detections, mode: str, index: int = 0) -> Detections:
    """Face selection: 'largest' (Face0: the largest box only), 'all' or 'index' (both left to right)."""
    if not len(det):
        return det
    if mode == "largest":
        area = (det.boxes[:, 2] - det.boxes[:, 0]) * (det.boxes[:, 3] - det.boxes[:, 1])
        return det.keep(np.array([int(area.argmax())]))
    order = np.argsort((det.boxes[:, 0] + det.boxes[:, 2]) / 2.0, kind="stable")
    if mode == "all":
        return det.keep(order)
    if mode == "index":
        return det.keep(order[index:index + 1])
    raise ValueError(f"select: unknown mode {mode!r} (largest, all, index)")
