"""The fixed-point entropy-parameter networks (:mod:`comneck.fixed_point`) as ONNX graphs that ONNX
Runtime evaluates to the same bits as the torch path.

ONNX Runtime's CPU kernels have no float64 ``Conv`` or ``ConvTranspose`` and no integer
convolution wider than 8 bits (``ConvInteger``), so each convolution is written as what it is: a
sum over its kernel taps of a shifted slice of the input times that tap's weight matrix, with
float64 ``MatMul`` (NHWC, so the channel axis is the one contracted). That is exact for the same
reason the torch path is: every operand is an integer, every partial sum an integer below 2**52
(checked per channel when the network is built), so float64 holds each one exactly and neither
the GEMM's blocking nor the order of the taps' ``Sum`` can change a bit. GEMMs do not use
Winograd or Strassen, which would round. The elementwise steps after it (bias, power-of-two
unscale, floor, leaky slope, clamp) are the IEEE operations the equations in
:mod:`comneck.fixed_point` state, in their order, each exact on these values (the torch path folds
the bias and the power of two into its matrix product: the same exact values).

A transposed convolution of stride s (whose output is s times its input, as CompressAI's
``deconv`` gives) is split into its s x s output phases; each phase is an ordinary sum of shifted
slices, and the phases are interleaved back. Dynamic image sizes need no shape arithmetic for
slices: slice ends count from the end of the padded input.

Written by hand, not exported from torch: the torch ONNX exporter would emit float64 ``Conv``.
"""

from __future__ import annotations

from itertools import count

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from .fixed_point import _LIMIT, _SCALE, FixedPointNet

#: The opset the edge graphs are written for (ONNX Runtime >= 1.14 runs it).
OPSET = 17
_END = np.iinfo(np.int64).max


class _Graph:
    """Nodes and constants of one graph under construction, with fresh names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.constants: list[onnx.TensorProto] = []
        self._ids = count()

    def const(self, value: np.ndarray | float | list[int], dtype: type = np.float64) -> str:
        name = f"c{next(self._ids)}"
        self.constants.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, kind: str, *inputs: str, **attrs: object) -> str:
        out = f"t{next(self._ids)}"
        self.nodes.append(helper.make_node(kind, list(inputs), [out], **attrs))
        return out

    def ints(self, values: list[int]) -> str:
        return self.const(values, np.int64)

    def shifted(self, x: str, pad: int, offsets: tuple[int, int], stride: int = 1) -> str:
        """``x`` [1, H, W, C] zero-padded by ``pad`` on each side of H and W, then sliced from
        ``pad + offset`` on each axis (with ``stride``), as many rows as the layer's output has."""
        starts = [pad + o for o in offsets]
        ends = [-(pad - o) if pad - o else _END for o in offsets] if stride == 1 else [_END, _END]
        return self.op("Slice", x, self.ints(starts), self.ints(ends), self.ints([1, 2]), self.ints([stride, stride]))

    def padded(self, x: str, pad: int) -> str:
        return x if not pad else self.op("Pad", x, self.ints([0, pad, pad, 0, 0, pad, pad, 0]))

    def taps(self, x: str, pieces: list[tuple[tuple[int, int], np.ndarray]], pad: int) -> str:
        """Sum over ``pieces`` of (input shifted by the offset) @ weight matrix [C_in, C_out]."""
        source = self.padded(x, pad)
        terms = [self.op("MatMul", self.shifted(source, pad, offset), self.const(matrix)) for offset, matrix in pieces]
        return terms[0] if len(terms) == 1 else self.op("Sum", *terms)


def _conv_pieces(weight: np.ndarray, padding: int) -> list[tuple[tuple[int, int], np.ndarray]]:
    """A stride-1 convolution's taps: (offset from the output position, [C_in, C_out] matrix);
    taps whose weights are all zero (a masked context convolution's) are left out."""
    k = weight.shape[-1]
    return [((i - padding, j - padding), np.ascontiguousarray(weight[:, :, i, j].T))
            for i in range(k) for j in range(k) if np.any(weight[:, :, i, j])]


def _phase_pieces(weight: np.ndarray, stride: int, padding: int, a: int, b: int) -> list[tuple[tuple[int, int], np.ndarray]]:
    """Output phase (a, b) of a transposed convolution: out[s*Y + a, s*X + b] sums
    x[Y - di, X - dj] @ W[:, :, i, j] over the taps with i = s*di + a + p (and j likewise)."""
    k = weight.shape[-1]
    return [((-((i - a - padding) // stride), -((j - b - padding) // stride)), np.ascontiguousarray(weight[:, :, i, j]))
            for i in range(k) if (i - a - padding) % stride == 0
            for j in range(k) if (j - b - padding) % stride == 0 and np.any(weight[:, :, i, j])]


def _layer(g: _Graph, x: str, layer: object) -> str:
    """One :class:`comneck.fixed_point._Layer` on an NHWC float64 grid tensor."""
    conv = layer.conv
    weight = layer.weight.numpy()
    if isinstance(conv, nn.ConvTranspose2d):
        (s, _), (p, _), (op, _), k = conv.stride, conv.padding, conv.output_padding, weight.shape[-1]
        if k - 2 * p + op != s or conv.dilation != (1, 1) or len(set(conv.stride)) > 1 or len(set(conv.padding)) > 1:
            raise ValueError("the ONNX edge takes transposed convolutions whose output is stride x input (CompressAI's deconv)")
        phases = []
        for a in range(s):
            row = []
            for b in range(s):
                pieces = _phase_pieces(weight, s, p, a, b)
                reach = max(abs(v) for offset, _ in pieces for v in offset)
                row.append(g.op("Unsqueeze", g.taps(x, pieces, reach), g.ints([3])))
            phases.append(g.op("Unsqueeze", g.op("Concat", *row, axis=3), g.ints([2])))
        stacked = g.op("Concat", *phases, axis=2)  # [1, H, s, W, s, C]
        shape = g.op("Shape", x)
        size = g.op("Mul", g.op("Slice", shape, g.ints([1]), g.ints([3])), g.ints([s, s]))
        acc = g.op("Reshape", stacked, g.op("Concat", g.ints([1]), size, g.ints([weight.shape[1]]), axis=0))
    else:
        p = conv.padding[0]
        if conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1 or conv.padding != (p, p) or weight.shape[-1] != 2 * p + 1:
            raise ValueError("the ONNX edge takes stride-1, ungrouped convolutions of odd kernel padded to keep the size "
                             "in the parameter networks")
        acc = g.taps(x, _conv_pieces(weight, p), p)
    unscale = layer.unscale.numpy().reshape(-1)
    a = g.op("Floor", g.op("Add", g.op("Mul", g.op("Add", acc, g.const(layer.bias.numpy())), g.const(unscale)), g.const(0.5)))
    if layer.slope is not None:
        leaked = g.op("Floor", g.op("Add", g.op("Mul", a, g.const(layer.slope)), g.const(0.5)))
        a = g.op("Where", g.op("Less", a, g.const(0.0)), leaked, a)
    return g.op("Min", g.op("Max", a, g.const(-_LIMIT)), g.const(_LIMIT))


def fixed_point_graph(net: FixedPointNet, name: str) -> onnx.ModelProto:
    """``net`` as an ONNX model: input ``x`` float32 [1, C, H, W] -> output ``y`` float32
    [1, C', H', W'], the same bits as ``net(x)``."""
    g = _Graph()
    a = g.op("Floor", g.op("Add", g.op("Mul", g.op("Cast", "x", to=TensorProto.DOUBLE), g.const(_SCALE)), g.const(0.5)))
    a = g.op("Transpose", g.op("Min", g.op("Max", a, g.const(-_LIMIT)), g.const(_LIMIT)), perm=[0, 2, 3, 1])
    for layer in net._layers:
        a = _layer(g, a, layer)
    out = g.op("Div", g.op("Transpose", a, perm=[0, 3, 1, 2]), g.const(_SCALE))
    g.nodes.append(helper.make_node("Cast", [out], ["y"], to=TensorProto.FLOAT))
    graph = helper.make_graph(g.nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, None, None, None])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, None, None, None])], g.constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="comneck")
    model.ir_version = 8  # readable by every ONNX Runtime since 1.14
    onnx.checker.check_model(model)
    return model
