"""A stand-in for insightface's ``inswapper_128.onnx``, written at test time with the ``onnx`` package.

Same signature as the real model (insightface ``model_zoo/inswapper.py``): inputs ``target`` (1, 3, 128, 128) RGB
in [0, 1] and ``source`` (1, 512) identity latent, output (1, 3, 128, 128) in [0, 1]; the emap is the graph's last
initialiser. Its output is a known function of both inputs, so a test can compute the swapped crop by hand::

    output = 0.5 * (1 - target) + 0.5 * sigmoid(source @ v)      (the same scalar added to every pixel)

``v`` and ``emap`` are seeded random (emap (embed_dim, 512): embed_dim 512 as the real model, or the test
recogniser's 128).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .onnx_standins import save_graph

LATENT = 512


def stand_in_tensors(embed_dim: int = 512, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(v (512,), emap (embed_dim, 512)) of the stand-in made with this seed."""
    rng = np.random.default_rng(seed)
    v = (rng.standard_normal(LATENT) / np.sqrt(LATENT) * 4.0).astype(np.float32)
    emap = rng.standard_normal((embed_dim, LATENT)).astype(np.float32)
    return v, emap


def expected_output(target: np.ndarray, latent: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The stand-in's output for a (128, 128, 3) target and (1, 512) latent, by hand (HWC)."""
    s = 1.0 / (1.0 + np.exp(-float(np.asarray(latent, np.float64).reshape(-1) @ v.astype(np.float64))))
    return (0.5 * (1.0 - target.astype(np.float64)) + 0.5 * s).astype(np.float32)


def write_stand_in(path: str | Path, embed_dim: int = 512, seed: int = 0) -> Path:
    from onnx import TensorProto, helper, numpy_helper

    v, emap = stand_in_tensors(embed_dim, seed)
    inits = [
        numpy_helper.from_array(v.reshape(LATENT, 1), "v"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.array(0.5, np.float32), "half"),
        numpy_helper.from_array(np.array([1, 1, 1, 1], np.int64), "shape4"),
        numpy_helper.from_array(emap, "emap"),  # last, as in inswapper_128.onnx
    ]
    nodes = [
        helper.make_node("MatMul", ["source", "v"], ["s"]),
        helper.make_node("Sigmoid", ["s"], ["sig"]),
        helper.make_node("Reshape", ["sig", "shape4"], ["sig4"]),
        helper.make_node("Mul", ["sig4", "half"], ["b"]),
        helper.make_node("Sub", ["one", "target"], ["neg"]),
        helper.make_node("Mul", ["neg", "half"], ["a"]),
        helper.make_node("Add", ["a", "b"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes, "inswapper_stand_in",
        [helper.make_tensor_value_info("target", TensorProto.FLOAT, [1, 3, 128, 128]),
         helper.make_tensor_value_info("source", TensorProto.FLOAT, [1, LATENT])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3, 128, 128])],
        initializer=inits)
    return save_graph(graph, path)
