"""Synthetic checkpoints in the published layouts, written from the official module
definitions (names, shapes, order), with a reference forward in the official semantics.

``ElicLLMReference`` mirrors ``ELIC_LLM`` (NYCU-MAPL/BridgingCompressionMLLM,
compressai/models/ELIC.py) and ELiC-ReImplemetation's ``TestModel``: its ``state_dict()`` is a
checkpoint in that layout (CompressAI 1.2.0 names for the entropy bottleneck:
``_matrix0``, ``_bias0``, ``_factor0``), and :meth:`ElicLLMReference.y_hat` computes the
quantised latents the way the official forward does at inference (no noise).
Its widths generalise the official 640 (= 2M), 224, 128 and 512 so tiny presets fit too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from compressai.entropy_models import GaussianConditional
from compressai.layers import AttentionBlock
from torch import nn


def conv(cin: int, cout: int, k: int = 5, s: int = 2) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=s, padding=k // 2)


def deconv(cin: int, cout: int, k: int = 5, s: int = 2) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(cin, cout, k, stride=s, output_padding=s - 1, padding=k // 2)


class Bottleneck(nn.Module):
    """ELIC_LLM's ResidualBottleneckBlock: conv1 (1x1, N -> N/2), conv2 (3x3), conv3 (1x1), plus x."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.conv1, self.conv2, self.conv3 = conv(n, n // 2, 1, 1), conv(n // 2, n // 2, 3, 1), conv(n // 2, n, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv3(F.relu(self.conv2(F.relu(self.conv1(x)))))


class LegacyBottleneckParams(nn.Module):
    """CompressAI 1.2.0 EntropyBottleneck's state: _matrix{i}, _bias{i}, _factor{i}, quantiles, tables."""

    def __init__(self, channels: int, filters: tuple[int, ...] = (3, 3, 3, 3)) -> None:
        super().__init__()
        f = (1, *filters, 1)
        for i in range(len(filters) + 1):
            self.register_parameter(f"_matrix{i}", nn.Parameter(torch.randn(channels, f[i + 1], f[i]) * 0.3 + 0.5))
            self.register_parameter(f"_bias{i}", nn.Parameter(torch.rand(channels, f[i + 1], 1) - 0.5))
            if i < len(filters):
                self.register_parameter(f"_factor{i}", nn.Parameter(torch.randn(channels, f[i + 1], 1) * 0.1))
        medians = torch.randn(channels) * 0.3
        self.quantiles = nn.Parameter(torch.stack([medians - 8, medians, medians + 8], -1).unsqueeze(1))
        self.likelihood_lower_bound = nn.Module()
        self.likelihood_lower_bound.register_buffer("bound", torch.tensor([1e-9]))
        for name in ("_offset", "_quantized_cdf", "_cdf_length"):
            self.register_buffer(name, torch.zeros(channels, dtype=torch.int32))
        self.register_buffer("target", torch.tensor([-20.7233, 0.0, 20.7233]))


class CheckerboardConv(nn.Conv2d):
    """CheckboardMaskedConv2d: 5x5 taps kept at (0::2, 1::2) and (1::2, 0::2), weight masked in forward."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(cin, cout, 5, padding=2)
        self.register_buffer("mask", torch.zeros_like(self.weight))
        self.mask[:, :, 0::2, 1::2] = 1
        self.mask[:, :, 1::2, 0::2] = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=2)


class ElicLLMReference(nn.Module):
    def __init__(self, N: int, M: int, groups: tuple[int, ...]) -> None:
        super().__init__()
        self.groups = list(groups)
        rb = lambda: Bottleneck(N)  # noqa: E731
        self.g_a = nn.Sequential(conv(3, N), rb(), rb(), rb(), conv(N, N), rb(), rb(), rb(), AttentionBlock(N),
                                 conv(N, N), rb(), rb(), rb(), conv(N, M), AttentionBlock(M))
        self.g_s = nn.Sequential(AttentionBlock(M), deconv(M, N), rb(), rb(), rb(), deconv(N, N), AttentionBlock(N),
                                 rb(), rb(), rb(), deconv(N, N), rb(), rb(), rb(), deconv(N, 3))
        self.h_a = nn.Sequential(conv(M, N, 3, 1), nn.ReLU(), conv(N, N), nn.ReLU(), conv(N, N))
        self.h_s = nn.Sequential(deconv(N, N), nn.ReLU(), deconv(N, N * 3 // 2), nn.ReLU(), conv(N * 3 // 2, 2 * M, 3, 1))
        g = self.groups
        self.cc_transforms = nn.ModuleList(
            nn.Sequential(conv(g[0] + (g[i - 1] if i > 1 else 0), 224, 5, 1), nn.ReLU(), conv(224, 128, 5, 1), nn.ReLU(),
                          conv(128, 2 * g[i], 5, 1))
            for i in range(1, len(g))
        )
        self.context_prediction = nn.ModuleList(CheckerboardConv(g[k], 2 * g[k]) for k in range(len(g)))
        self.ParamAggregation = nn.ModuleList(
            nn.Sequential(conv(2 * M + (2 * g[k] if k else 0) + 2 * g[k], 2 * M, 1, 1), nn.ReLU(), conv(2 * M, 512, 1, 1),
                          nn.ReLU(), conv(512, 2 * g[k], 1, 1))
            for k in range(len(g))
        )
        self.entropy_bottleneck = LegacyBottleneckParams(N)
        self.gaussian_conditional = GaussianConditional(None)

    @torch.no_grad()
    def y_hat(self, x: torch.Tensor) -> torch.Tensor:
        """Quantised latents as the official inference computes them."""
        y = self.g_a(x)
        z = self.h_a(y)
        medians = self.entropy_bottleneck.quantiles[:, 0, 1].view(1, -1, 1, 1)
        hyper = self.h_s(torch.round(z - medians) + medians)  # [means | scales] of y
        anchor = torch.zeros_like(y[:1, :1])
        anchor[..., 0::2, 0::2] = 1
        anchor[..., 1::2, 1::2] = 1
        done: list[torch.Tensor] = []
        for k, y_k in enumerate(torch.split(y, self.groups, 1)):
            if k == 0:
                support = hyper
            else:
                previous = done[0] if k == 1 else torch.cat([done[0], done[k - 1]], 1)
                support = torch.cat([self.cc_transforms[k - 1](previous), hyper], 1)
            zeros = torch.zeros(y.shape[0], 2 * self.groups[k], *y.shape[-2:])
            means_a = self.ParamAggregation[k](torch.cat([zeros, support], 1)).chunk(2, 1)[0]
            y_anchor = (torch.round(y_k - means_a) + means_a) * anchor
            context = self.context_prediction[k](y_anchor)
            means_n = self.ParamAggregation[k](torch.cat([context, support], 1)).chunk(2, 1)[0]
            done.append(y_anchor + (torch.round(y_k - means_n) + means_n) * (1 - anchor))
        return torch.cat(done, 1)


def elic_llm_checkpoint(N: int, M: int, groups: tuple[int, ...], seed: int = 0) -> ElicLLMReference:
    """A seeded ELIC_LLM-layout model whose latents are large enough to code many symbols."""
    torch.manual_seed(seed)
    model = ElicLLMReference(N, M, groups).eval()
    with torch.no_grad():
        model.g_a[-2].weight.mul_(40.0)  # spread y over several quantisation steps
    return model
