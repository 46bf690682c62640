"""Fixed-point entropy parameters: every machine picks the same rANS tables for the same bytes.

ELIC chooses each latent's Gaussian (scale index, mean) with float networks: the hyper-synthesis
``h_s``, the channel-context and checkerboard-context networks and the entropy-parameter layers.
Their float results depend on summation order (threads, batch, BLAS, oneDNN, CPU vs CUDA), and a
scale that lands on the other side of a table boundary on the decoder makes the rest of the
stream garbage. Here the same trained weights are evaluated in fixed point instead, in the spirit
of Ballé et al., "Integer networks for data compression with latent-variable models" (ICLR 2019),
but converted at load time, so imported float weights work without retraining.

The equations (the specification; ``tests/test_fixed_point.py`` restates them in int64):

* activations (inputs, hidden layers, outputs) are integers times ``2**-FRACTION_BITS``, clamped
  to ``+-ACTIVATION_LIMIT``: means and scales come out on that grid, so ``y_hat = symbol + mean``
  is the same float everywhere; an input is ``a = clamp(floor(x * 2**10 + 1/2))``;
* each output channel's weights are integers ``W`` times a power of two ``2**-s``, ``s`` chosen so
  that no sum a layer forms can reach ``2**52``: ``sum |W| * 2**23 + |b| < 2**52`` per output
  channel, checked when the net is built (``2**23`` is the activation limit on the grid);
* a layer's output is ``clamp(act(floor((W * a + b) * 2**-s + 1/2)))``, ``W * a`` the exact
  integer convolution and ``b`` the bias integer; a leaky ReLU's slope is a multiple of
  ``2**-SLOPE_BITS`` and rounds the same way, ``floor(a * slope + 1/2)``; ReLU is slope 0.

How it is evaluated, and why that is exact by construction (:class:`_Kernel`):

* every convolution is one matrix product in float64, built from copies and a BLAS ``dgemm``
  (``torch.addmm`` / ``torch.matmul``): the zero-padded input's patches are one strided view,
  copied once into columns (im2col), or, for a 1x1 convolution, the input is the matrix (in a
  network of 1x1 layers only, with the positions as rows: the same products, transposed); a
  transposed convolution multiplies every input pixel by its kernel first and adds the
  overlapping patches after (``fold``, col2im). No convolution kernel runs, so no oneDNN /
  cuDNN / NNPACK algorithm (Winograd and FFT round, even on integers) can be picked, on the CPU
  or on CUDA. (Grouped convolutions, in none of the codecs here, run torch's float64
  convolution with cuDNN off: im2col and a matrix product too.)
* the weights and bias are stored pre-multiplied by their channel's ``2**-s`` (exact: a power of
  two changes the exponent only). Every value the product forms, in any order, blocking, thread
  split or fused multiply-add, is then ``P * 2**-s`` with ``P`` a sum of a subset of the integer
  terms ``W_i * a_i`` and ``b``, so ``|P| <= sum |W| * 2**23 + |b| < 2**52``: float64 (53-bit
  significand) holds every such value exactly, so every product and addition is exact and the
  result is exactly ``(W * a + b) * 2**-s``, the value the equations round. ``fold`` adds
  subsets of the same terms, so the same bound covers it;
* what adds exact zeros (for finite inputs) is left out: taps whose weights are all zero (a
  checkerboard context convolution's mask), input channels outside the first and last that are
  not all zero (the context's first pass; the context part of the entropy-parameter layers'
  input in the first pass), and, for a layer whose used taps all have offsets (i + j) of one
  parity, the outputs of the checkerboard colour that reads only zeros when the input is zero
  on the other colour (the context's second pass): those are the bias alone, as is everything
  for an all-zero input;
* the rounding steps are ``+1/2`` and ``floor`` on the same float64 values the equations state;
  the clamps and ``a * slope`` are exact. So the output bits do not depend on the device, the
  thread count, the batch or the memory layout, and equal the straightforward evaluation's
  (torch's float64 convolutions on the integers, which ``tests/test_fixed_point.py`` keeps as
  the reference).

Why not float32, which runs these products 2-3x faster on a CPU: the weight integers fill 17 to 24
bits (the scale keeps the trained weights' precision) and ``sum |W|`` is ``2**26.5`` and more per
output channel in ELIC's networks, so the sums' bound, ``sum |W|`` times the largest activation,
passes ``2**24`` (where float32 stops holding integers) once an activation is one grid step: no
layer qualifies, at any activation bound. Splitting weights and activations into limbs whose sums
(up to 5600 terms) stay below ``2**24`` needs six or more float32 products per float64 one.
Winograd transforms, exact in float64 on integers while sums stay below ``2**53``, grow the sums
by about ``2**14`` for the 5x5 layers, past ``2**53`` at activations of order 1.

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
    """One layer's integers as the equations state them; :class:`_Kernel` evaluates them."""

    weight: torch.Tensor  # float64 integers, Conv2d / ConvTranspose2d layout
    bias: torch.Tensor  # float64 integers [out], on the weights' scale
    unscale: torch.Tensor  # float64 powers of two [1, out, 1, 1]: integers -> activation grid
    conv: nn.Conv2d | nn.ConvTranspose2d  # geometry only (stride, padding, ...)
    #: None: no activation follows; else the negative slope of the (leaky) ReLU that does, a
    #: multiple of 2**-SLOPE_BITS (0.0: ReLU)
    slope: float | None = None

    def activated(self, slope: float) -> "_Layer":
        """This layer followed by a (leaky) ReLU of negative slope ``slope``."""
        return _Layer(self.weight, self.bias, self.unscale, self.conv, slope)


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


class _Kernel:
    """A :class:`_Layer` as one float64 matrix product on one device (see the module docstring):
    weights [out, in x taps] (a transposed convolution: [out x taps, in]) and bias [out, 1], both
    pre-multiplied by the output channel's power of two; only the taps with a nonzero weight."""

    def __init__(self, layer: _Layer, device: torch.device) -> None:
        c = layer.conv
        self.slope = layer.slope
        self.transposed = isinstance(c, nn.ConvTranspose2d)
        self.kernel_size, self.stride = _pair(c.kernel_size), _pair(c.stride)
        self.padding, self.dilation = _pair(c.padding), _pair(c.dilation)
        self.output_padding = _pair(c.output_padding) if self.transposed else (0, 0)
        scale = layer.unscale.view(-1)  # powers of two: multiplying by them is exact
        self.bias = (layer.bias * scale).view(-1, 1).to(device)
        self.grouped: torch.Tensor | None = None  # groups > 1: torch's own convolution, see __call__
        self.taps: tuple[torch.Tensor, torch.Tensor] | None = None  # rows, columns of the taps used; None: all
        #: all used taps at offsets (i + j) of this parity (stride 1, no dilation): an input that is
        #: zero on one checkerboard colour then reaches only the outputs of one colour
        self.tap_parity: int | None = None
        #: a 1x1 convolution's weights transposed, for activations held as rows [positions, in]
        self.pointwise_weight: torch.Tensor | None = None
        w = layer.weight
        if self.transposed:  # [in, out, kh, kw] -> [out x kh x kw, in]
            self.per_channel = 1
            self.weight = (w * scale.view(1, -1, 1, 1)).flatten(1).t().contiguous().to(device)
            return
        w = w * scale.view(-1, 1, 1, 1)
        if c.groups != 1:
            self.grouped, self.groups, self.per_channel = w.to(device), c.groups, 0
            self.weight = self.grouped
            return
        used = (w != 0).flatten(0, 1).any(0)
        if not bool(used.any()):
            used[0, 0] = True  # an all-zero layer: one tap of zeros keeps the shapes
        if bool(used.all()):
            self.per_channel = used.numel()
            self.weight = w.flatten(1).contiguous().to(device)
            if self.kernel_size == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0):
                self.pointwise_weight = self.weight.t().contiguous()  # [in, out], see rows()
            return
        rows, cols = used.nonzero(as_tuple=True)  # row-major, as w[:, :, used] orders them
        self.taps = (rows.to(device), cols.to(device))
        self.per_channel = rows.numel()
        self.weight = w[:, :, used].flatten(1).contiguous().to(device)
        parities = set(((rows + cols) % 2).tolist())
        if len(parities) == 1 and self.stride == (1, 1) and self.dilation == (1, 1):
            self.tap_parity = parities.pop()

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        if self.transposed:
            (oh, ow) = self.output_padding
            return (h - 1) * sh - 2 * ph + dh * (kh - 1) + oh + 1, (w - 1) * sw - 2 * pw + dw * (kw - 1) + ow + 1
        return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1

    def reached_colour(self, zero_colour: int) -> int:
        """The checkerboard colour (positions with (y + x) % 2 equal to it) of the outputs that an
        input zero on colour ``zero_colour`` still reaches: output (y, x) reads input
        (y + i - ph, x + j - pw), of colour (y + x + tap_parity - ph - pw) % 2; the outputs of the
        other colour read only zeros."""
        return (1 - zero_colour + self.tap_parity - sum(self.padding)) % 2

    @staticmethod
    def colour_view(t: torch.Tensor, colour: int) -> torch.Tensor:
        """The positions of ``colour`` in ``t`` [..., H, W] (H, W even) as a view [..., 2, H/2, W/2]:
        (y, x) = (2u + v, 2w + (colour + v) % 2) for v in {0, 1}, an offset linear in v."""
        *lead, h, w = t.shape
        *strides, sy, sx = t.stride()
        step = sy + sx if colour == 0 else sy - sx
        return t.as_strided((*lead, 2, h // 2, w // 2), (*strides, step, 2 * sy, 2 * sx), t.storage_offset() + colour * sx)

    def _columns(self, a: torch.Tensor, ho: int, wo: int, colour: int | None) -> torch.Tensor:
        """The input's patches as columns [N, in x taps, ho x wo] (or only the outputs of
        checkerboard ``colour``, in :meth:`colour_view` order): one strided view of the padded
        input, copied once (exact)."""
        n, c = a.shape[:2]
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        if (kh, kw, sh, sw, ph, pw) == (1, 1, 1, 1, 0, 0):
            return a.reshape(n, c, ho * wo)
        padded = F.pad(a, (pw, pw, ph, ph)) if ph or pw else a
        s = padded.stride()
        patches = padded.as_strided((n, c, kh, kw, ho, wo), (s[0], s[1], dh * s[2], dw * s[3], sh * s[2], sw * s[3]))
        if colour is not None:
            patches = self.colour_view(patches, colour)
        if self.taps is not None:
            patches = patches[:, :, self.taps[0], self.taps[1]]  # [N, in, taps, ...]
        return patches.reshape(n, c * self.per_channel, ho * wo if colour is None else ho * wo // 2)

    def __call__(self, a: torch.Tensor, channels: tuple[int, int] | None = None, zero_colour: int | None = None) -> torch.Tensor:
        """The layer on grid integers ``a`` [N, in, H, W]. What is known of ``a`` (from the
        network's input, see :meth:`FixedPointNet.__call__`): ``channels``, the input channels
        ``[first, last)`` outside which it is all zero (None: all); ``zero_colour``, the
        checkerboard colour on which it is all zero (None: neither)."""
        n, _, h, w = a.shape
        ho, wo = self.output_size(h, w)
        weight = self.weight
        if channels is not None and self.grouped is None:
            first, last = channels
            a = a[:, first:last]
            weight = self.weight[:, first:last] if self.transposed else self.weight[:, first * self.per_channel : last * self.per_channel]
        if a.shape[1] == 0:  # an all-zero input: the bias alone
            acc = self.bias.view(1, -1, 1, 1).expand(n, self.bias.shape[0], ho, wo).clone()
        elif self.grouped is not None:  # not in the codecs here; cuDNN off: its kernels may round
            with torch.backends.cudnn.flags(enabled=False):
                acc = F.conv2d(a, self.grouped, None, self.stride, self.padding, self.dilation, self.groups)
            acc = acc.add_(self.bias.view(1, -1, 1, 1))
        elif self.transposed:  # multiply every input pixel by its kernel, add the overlaps
            acc = F.fold(torch.matmul(weight, a.reshape(n, a.shape[1], h * w)), (ho, wo), self.kernel_size, self.dilation,
                         self.padding, self.stride)
            acc = acc.add_(self.bias.view(1, -1, 1, 1))
        else:
            colour = None
            if zero_colour is not None and self.tap_parity is not None and ho % 2 == 0 and wo % 2 == 0:
                colour = self.reached_colour(zero_colour)
            cols = self._columns(a, ho, wo, colour)
            if n == 1:
                part = torch.addmm(self.bias, weight, cols[0]).unsqueeze(0)
            else:
                part = torch.matmul(weight, cols).add_(self.bias)
            out = self.bias.shape[0]
            if colour is None:
                acc = part.view(n, out, ho, wo)
            else:  # the outputs of the other colour read only zeros: the bias alone
                acc = self.bias.view(1, out, 1, 1).expand(n, out, ho, wo).clone()
                self.colour_view(acc, colour).copy_(part.view(n, out, 2, ho // 2, wo // 2))
        return self._round(acc)

    def rows(self, a: torch.Tensor, channels: tuple[int, int] | None = None) -> torch.Tensor:
        """A 1x1 convolution on activations held as rows, ``a`` [positions, in] -> [positions, out]:
        the same products as :meth:`__call__`'s, transposed (BLAS runs this shape faster)."""
        weight = self.pointwise_weight
        if channels is not None:
            a, weight = a[:, channels[0] : channels[1]], weight[channels[0] : channels[1]]
        if a.shape[1] == 0:
            return self._round(self.bias.view(1, -1).expand(a.shape[0], -1).clone())
        return self._round(torch.addmm(self.bias.view(1, -1), a, weight))

    def _round(self, acc: torch.Tensor) -> torch.Tensor:
        """``acc`` = (W * a + b) * 2**-s, exactly -> the layer's output on the grid (in place)."""
        acc = acc.add_(0.5).floor_()
        if self.slope is None:
            return acc.clamp_(-_LIMIT, _LIMIT)
        if self.slope == 0.0:  # ReLU: floor(a * 0 + 1/2) = 0 for a < 0
            return acc.clamp_(0.0, _LIMIT)
        # a * slope is exact: an integer below 2**24 times k * 2**-16
        return torch.where(acc < 0, (acc * self.slope).add_(0.5).floor_(), acc).clamp_(-_LIMIT, _LIMIT)


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


def _to_grid(x: torch.Tensor) -> torch.Tensor:
    """float64 ``x`` -> its grid integers, in place: clamp(floor(x * 2**10 + 1/2))."""
    return x.mul_(_SCALE).add_(0.5).floor_().clamp_(-_LIMIT, _LIMIT)


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
        self._on_device: dict[torch.device, list[_Kernel]] = {}

    def kernels(self, device: torch.device) -> list[_Kernel]:
        """The layers' matrix forms on ``device`` (built on first use, then kept)."""
        kernels = self._on_device.get(device)
        if kernels is None:
            kernels = self._on_device[device] = [_Kernel(layer, device) for layer in self._layers]
        return kernels

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (any float dtype) -> the network's output on the grid, in ``x``'s dtype."""
        kernels = self.kernels(x.device)
        first = kernels[0]
        # What the first layer may leave out: input channels and a checkerboard colour where x is
        # all zero (so its grid integers are too; NaN counts as nonzero).
        used = x.abs().amax((0, 2, 3)).nonzero().view(-1).tolist() if x.numel() else []
        channels = (used[0], used[-1] + 1) if used else (0, 0)
        zero_colour = None
        if first.tap_parity is not None and used:
            zero_colour = next((colour for colour in (0, 1) if not (bool(x[..., 0::2, colour::2].any()) or
                                                                    bool(x[..., 1::2, 1 - colour::2].any()))), None)
        known = channels if channels != (0, x.shape[1]) else None
        if all(kernel.pointwise_weight is not None for kernel in kernels):  # 1x1 layers only: positions as rows
            n, _, h, w = x.shape
            a = x.permute(0, 2, 3, 1).to(torch.float64, memory_format=torch.contiguous_format, copy=True).view(n * h * w, x.shape[1])
            a = first.rows(_to_grid(a), known)
            for kernel in kernels[1:]:
                a = kernel.rows(a)
            a = a.mul_(1.0 / _SCALE).view(n, h, w, a.shape[1]).permute(0, 3, 1, 2)
            return a.to(x.dtype, memory_format=torch.contiguous_format)
        a = first(_to_grid(x.to(torch.float64, copy=True)), known, zero_colour)
        for kernel in kernels[1:]:
            a = kernel(a)
        return a.mul_(1.0 / _SCALE).to(x.dtype)


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
