"""Cosine similarity between two sets of face embeddings, as a matrix, a text table and a heatmap."""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(Na, D) x (Nb, D) -> (Na, Nb) cosine similarity (rows normalised here; zero rows give 0)."""
    return F.normalize(a.float(), dim=1) @ F.normalize(b.float(), dim=1).T


def best_score(sim: torch.Tensor, same_set: bool) -> float:
    """The highest similarity; with one set against itself, the diagonal (a face with itself) is ignored."""
    if same_set:
        if sim.shape[0] < 2:
            return float("nan")
        sim = sim.masked_fill(torch.eye(sim.shape[0], dtype=torch.bool), float("-inf"))
    return float(sim.max()) if sim.numel() else float("nan")


def table(sim: torch.Tensor, rows: list[str], cols: list[str]) -> str:
    """A fixed-width text table of the matrix, 3 decimals."""
    w = max([6, *map(len, rows)])
    cw = max([6, *map(len, cols)])
    head = " " * w + " | " + " ".join(c.rjust(cw) for c in cols)
    lines = [head, "-" * len(head)]
    for name, row in zip(rows, sim.tolist()):
        lines.append(name.ljust(w) + " | " + " ".join(f"{v:+.3f}".rjust(cw) for v in row))
    return "\n".join(lines)


def heatmap(sim: torch.Tensor, cell: int = 96) -> torch.Tensor:
    """(1, H, W, 3) float image of the matrix: -1 blue .. 0 black .. +1 red-yellow, value written in each cell."""
    m = sim.clamp(-1, 1).numpy()
    na, nb = m.shape
    cell = max(8, min(cell, 2048 // max(na, nb, 1)))
    pos = np.clip(m, 0, 1)
    neg = np.clip(-m, 0, 1)
    rgb = np.stack([pos, pos**2, neg], axis=-1).astype(np.float32)  # (na, nb, 3)
    img = np.ascontiguousarray(np.repeat(np.repeat(rgb * 255.0 + 0.5, cell, 0), cell, 1).astype(np.uint8))
    if cell >= 32:
        scale = cell / 96.0
        for i in range(na):
            for j in range(nb):
                txt = f"{m[i, j]:.2f}"
                (tw, th), _ = cv2.getTextSize(txt, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
                org = (j * cell + (cell - tw) // 2, i * cell + (cell + th) // 2)
                bright = float(rgb[i, j] @ np.array([0.299, 0.587, 0.114], np.float32)) > 0.5  # luma
                ink = (0, 0, 0) if bright else (255, 255, 255)
                cv2.putText(img, txt, org, cv2.FONT_HERSHEY_SIMPLEX, scale, ink, 1, cv2.LINE_AA)
    return torch.from_numpy(img.astype(np.float32) / 255.0)[None]
