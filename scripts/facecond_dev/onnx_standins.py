"""Stand-in insightface ``genderage`` ONNX graphs, built at test time with the ``onnx`` package.

The real genderage.onnx (buffalo_l) cannot be downloaded here. A stand-in has the real one's interface
(input ``data`` 1x3x96x96, one output ``fc1`` 1x3 = [p_female, p_male, age/100]) and outputs a test controls:

    fc1 = flatten(data) @ W + b

W = 0 gives the constant ``b`` for every face (the trigger-word mapping by hand); a random W makes the output
depend on every input pixel (the crop and normalisation against insightface's own ``Attribute.get``).
``mxnet_prefix`` adds Sub and Mul nodes in front (named as MXNet exports name them), which switches
insightface's input normalisation from (127.5, 128) to (0, 1).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SIZE = 96


def genderage_model(path: str | Path, p_female: float, p_male: float, age: int | float, *,
                    weight_scale: float = 0.0, seed: int = 0, mxnet_prefix: bool = False) -> Path:
    from onnx import TensorProto, helper, numpy_helper

    n = 3 * SIZE * SIZE
    w = (np.random.default_rng(seed).standard_normal((n, 3)) * weight_scale).astype(np.float32)
    b = np.array([p_female, p_male, age / 100.0], np.float32)
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b"),
             numpy_helper.from_array(np.array([0, -1], np.int64), "flat_shape")]
    nodes, src = [], "data"
    if mxnet_prefix:
        inits += [numpy_helper.from_array(np.float32(0.0).reshape(1), "zero"),
                  numpy_helper.from_array(np.float32(1.0).reshape(1), "one")]
        nodes += [helper.make_node("Sub", ["data", "zero"], ["sub_out"], name="_minus0"),
                  helper.make_node("Mul", ["sub_out", "one"], ["mul_out"], name="_mul0")]
        src = "mul_out"
    nodes += [helper.make_node("Reshape", [src, "flat_shape"], ["flat"], name="flatten0"),
              helper.make_node("MatMul", ["flat", "W"], ["mm"], name="fc1_matmul"),
              helper.make_node("Add", ["mm", "b"], ["fc1"], name="fc1_add")]
    graph = helper.make_graph(nodes, "genderage_standin",
                              [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, SIZE, SIZE])],
                              [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [1, 3])], inits)
    return save_graph(graph, path)


def save_graph(graph, path: str | Path) -> Path:
    """An ONNX model of ``graph`` (opset 13, IR 8: what the pinned onnxruntime reads), checked and written."""
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path
