"""Fixed-point entropy parameters: every machine picks the same rANS tables for the same bytes.

ELIC chooses each latent's Gaussian (scale index, mean) with float networks: the hyper-synthesis
``h_s``, the channel-context and checkerboard-context networks and the entropy-parameter layers.
Their float results depend on summation order (threads, batch, BLAS, oneDNN, CPU vs CUDA), and a
scale that lands on the other side of a table boundary on the decoder makes the rest of the
stream garbage. Here the same trained weights are evaluated in fixed point instead, in the spirit
of Ballé et al., "Integer networks for data compression with latent-variable models" (ICLR 2019),
but converted at load time, so imported float weights work without retraining:

* activations (inputs, hidden layers, outputs) are integers times ``2**-FRACTION_BITS``, clamped
  to ``+-ACTIVATION_LIMIT``: means and scales come out on that grid, so ``y_hat = symbol + mean``
  is the same float everywhere;
* each output channel's weights are integers times a power of two chosen so that no sum a layer
  forms can reach ``2**52`` (checked per channel from the weights when the net is built);
* a leaky ReLU's slope is rounded to a multiple of ``2**-SLOPE_BITS``, so its products are exact;
* the convolutions run in float64 on those integers: every partial sum is an integer below
  2**53, so float64 holds it exactly and any summation order gives the same bits. Rounding back
  to the grid is a floor, exact too.

Written here because no maintained library evaluates PyTorch convolutions in integer arithmetic
on both CPU and CUDA (torch has no integer convolution kernels; quantised backends round their
own way per platform). The float path stays CompressAI's own; containers say which one coded them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from types import MethodType

import torch
from compressai.latent_codecs import ChannelGroupsLatentCodec, CheckerboardLatentCodec, GaussianConditionalLatentCodec, HyperLatentCodec
from torch import nn
from torch.nn import functional as F

#: Activations are integers times 2**-FRACTION_BITS (about 0.001).
FRACTION_BITS = 10
#: Largest activation magnitude; ELIC's parameter networks stay far below it. The grid's integers
#: then stay below 2**24, so every activation is exact in float32 too.
ACTIVATION_LIMIT = 2**13
_SCALE = float(2**FRACTION_BITS)
_LIMIT = float(ACTIVATION_LIMIT * 2**FRACTION_BITS)
#: Sums stay below this; float64 holds every integer up to 2**53 exactly.
_SUM_BOUND = 2.0**52
#: Weight integers need no more bits than float32 weights hold.
_WEIGHT_BITS = 24
#: Leaky slopes are multiples of 2**-SLOPE_BITS: activation (< 2**24) times slope numerator
#: (< 2**16) stays exact in float64.
SLOPE_BITS = 16

_enabled: ContextVar[bool] = ContextVar("comneck_fixed_point", default=False)


@dataclass(frozen=True)
class _Layer:
    weight: torch.Tensor  # float64 integers, Conv2d / ConvTranspose2d layout
    bias: torch.Tensor  # float64 integers [out], on the weights' scale
    unscale: torch.Tensor  # float64 powers of two [1, out, 1, 1]: integers -> activation grid
    conv: nn.Conv2d | nn.ConvTranspose2d  # geometry only (stride, padding, ...)
    #: None: no activation follows; else the negative slope of the (leaky) ReLU that does, a
    #: multiple of 2**-SLOPE_BITS (0.0: ReLU)
    slope: float | None = None

    def to(self, device: torch.device) -> "_Layer":
        return _Layer(self.weight.to(device), self.bias.to(device), self.unscale.to(device), self.conv, self.slope)

    def activated(self, slope: float) -> "_Layer":
        """This layer followed by a (leaky) ReLU of negative slope ``slope``."""
        return _Layer(self.weight, self.bias, self.unscale, self.conv, slope)

    def __call__(self, a: torch.Tensor) -> torch.Tensor:
        c = self.conv
        if isinstance(c, nn.ConvTranspose2d):
            acc = F.conv_transpose2d(a, self.weight, None, c.stride, c.padding, c.output_padding, c.groups, c.dilation)
        else:
            acc = F.conv2d(a, self.weight, None, c.stride, c.padding, c.dilation, c.groups)
        a = torch.floor((acc + self.bias.view(1, -1, 1, 1)) * self.unscale + 0.5)
        if self.slope is not None:  # a * slope is exact: an integer below 2**24 times k * 2**-16
            a = torch.where(a < 0, torch.floor(a * self.slope + 0.5), a)
        return a.clamp_(-_LIMIT, _LIMIT)


def dyadic_slope(slope: float) -> float:
    """A leaky ReLU's negative slope on the 2**-SLOPE_BITS grid (0.01 -> 655 / 65536)."""
    return round(slope * 2**SLOPE_BITS) / 2**SLOPE_BITS


def _integer_layer(conv: nn.Conv2d | nn.ConvTranspose2d) -> _Layer:
    """Per output channel: weights -> integers on the largest power-of-two scale that keeps every
    sum (at most sum |w| * input limit + |bias|) below 2**52."""
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ValueError("fixed-point entropy parameters need zero-padded convolutions with numeric padding")
    weight = conv.weight.detach().double().cpu()
    if hasattr(conv, "mask"):  # a masked context convolution: its masked taps are not used
        weight = weight * conv.mask.detach().double().cpu()
    per_out = weight.transpose(0, 1) if isinstance(conv, nn.ConvTranspose2d) else weight
    if isinstance(conv, nn.ConvTranspose2d) and conv.groups != 1:
        raise ValueError("fixed-point entropy parameters do not support grouped transposed convolutions")
    bias = conv.bias.detach().double().cpu() if conv.bias is not None else torch.zeros(per_out.shape[0], dtype=torch.float64)
    peak = per_out.abs().flatten(1).amax(1)
    exponent = torch.tensor([math.frexp(float(p))[1] if p > 0 else 0 for p in peak], dtype=torch.float64)
    shift = _WEIGHT_BITS - exponent  # |w| * 2**shift < 2**24
    while True:
        w_int = torch.round(per_out * torch.exp2(shift).view(-1, *[1] * (per_out.dim() - 1)))
        b_int = torch.round(bias * torch.exp2(shift + FRACTION_BITS))
        bound = w_int.abs().flatten(1).sum(1) * _LIMIT + b_int.abs()
        over = bound >= _SUM_BOUND
        if not bool(over.any()):
            break
        shift = shift - over.double()
    weight_int = w_int.transpose(0, 1).contiguous() if isinstance(conv, nn.ConvTranspose2d) else w_int.contiguous()
    return _Layer(weight_int, b_int, torch.exp2(-shift).view(1, -1, 1, 1), conv)


class FixedPointNet:
    """A Conv2d / ConvTranspose2d / ReLU / LeakyReLU network (a ``Sequential`` or one convolution)
    evaluated in fixed point: same input, same output bits, on any device, thread count or batch.
    A leaky slope is taken on the 2**-SLOPE_BITS grid (0.01 becomes 0.009995), so its products stay exact."""

    def __init__(self, module: nn.Module) -> None:
        children = list(module) if isinstance(module, nn.Sequential) else [module]
        self._layers: list[_Layer] = []
        for child in children:
            slope = 0.0 if isinstance(child, nn.ReLU) else dyadic_slope(child.negative_slope) if isinstance(child, nn.LeakyReLU) else None
            if slope is not None and self._layers and self._layers[-1].slope is None:
                self._layers[-1] = self._layers[-1].activated(slope)
            elif isinstance(child, (nn.Conv2d, nn.ConvTranspose2d)):
                self._layers.append(_integer_layer(child))
            else:
                raise ValueError("fixed-point entropy parameters support Conv2d, ConvTranspose2d, ReLU and LeakyReLU layers "
                                 f"(an activation after a convolution), not {type(child).__name__} there")
        self._on_device: dict[torch.device, list[_Layer]] = {torch.device("cpu"): self._layers}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (any float dtype) -> the network's output on the grid, in ``x``'s dtype."""
        layers = self._on_device.get(x.device)
        if layers is None:
            layers = self._on_device[x.device] = [layer.to(x.device) for layer in self._layers]
        a = torch.floor(x.double() * _SCALE + 0.5).clamp_(-_LIMIT, _LIMIT)
        # cuDNN may pick FFT or Winograd kernels, which round; the native kernels are im2col + GEMM.
        with torch.backends.cudnn.flags(enabled=False):
            for layer in layers:
                a = layer(a)
        return (a / _SCALE).to(x.dtype)


def parameter_networks(model: nn.Module) -> list[nn.Module]:
    """The networks in a CompressAI latent codec whose outputs choose the rANS tables and means."""
    found: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, HyperLatentCodec):
            found.append(module.h_s)
        elif isinstance(module, ChannelGroupsLatentCodec):
            found += list(module.channel_context.values())
        elif isinstance(module, CheckerboardLatentCodec):
            found += [module.context_prediction, module.entropy_parameters]
        elif isinstance(module, GaussianConditionalLatentCodec) and not isinstance(module.entropy_parameters, nn.Identity):
            found.append(module.entropy_parameters)
    return found


def _forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A parameter network's forward: fixed point inside :func:`fixed_point_parameters`, else float."""
    if _enabled.get():
        return self._comneck_fixed_point(x)
    return type(self).forward(self, x)


def install(model: nn.Module) -> None:
    """Build the fixed-point form of ``model``'s parameter networks from their current weights
    (again after every change of weights) and route their forwards through :func:`_forward`."""
    for module in parameter_networks(model):
        module._comneck_fixed_point = FixedPointNet(module)
        module.forward = MethodType(_forward, module)  # bound to the module: a deepcopy rebinds it


@contextmanager
def fixed_point_parameters(enabled: bool = True) -> Iterator[None]:
    """Within the block (this thread or task), installed parameter networks run in fixed point."""
    token = _enabled.set(enabled)
    try:
        yield
    finally:
        _enabled.reset(token)
