"""The post-processing baseline: the classic 4-level U-Net (Ronneberger et al., 2015) on x_hat.

Written here because no maintained library ships this exact network: 64 base channels
doubling to 1024, (3x3 conv, BatchNorm, ReLU) x 2 per level, max-pool down,
2x2 transposed-convolution up, skip concatenation; 31.04 M parameters for RGB in and out.
It predicts a residual that is added to its input, so an untrained net starts near identity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _double_conv(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """Image [B, C, H, W] -> enhanced image, same size (any H, W: padded to 16 inside)."""

    def __init__(self, channels: int = 3, base: int = 64, levels: int = 4) -> None:
        super().__init__()
        widths = [base * 2**i for i in range(levels + 1)]  # 64, 128, 256, 512, 1024
        self.levels = levels
        self.inc = _double_conv(channels, widths[0])
        self.down = nn.ModuleList(_double_conv(widths[i], widths[i + 1]) for i in range(levels))
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(widths[i + 1], widths[i], kernel_size=2, stride=2) for i in reversed(range(levels))
        )
        self.dec = nn.ModuleList(_double_conv(2 * widths[i], widths[i]) for i in reversed(range(levels)))
        self.outc = nn.Conv2d(widths[0], channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        stride = 2**self.levels
        pad_h, pad_w = (-h) % stride, (-w) % stride
        feats = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else x
        skips = [self.inc(feats)]
        for down in self.down:
            skips.append(down(F.max_pool2d(skips[-1], 2)))
        out = skips.pop()
        for up, dec in zip(self.up, self.dec):
            out = dec(torch.cat([skips.pop(), up(out)], dim=1))
        return x + self.outc(out)[..., :h, :w]
