"""Transform-neck: decoded latents y_hat -> the token sequence CLIP block k+1 expects.

Same structure and parameter names as the official ``Linear_Encoder``: a per-position
linear map of the M latent channels to CLIP's width, a learned class token, learned
positional embeddings, ``ln_pre`` and one CLIP residual attention block with QuickGELU.
The block is open_clip's own, so the state-dict keys match the official code's
(``transformer.resblocks.0.attn.in_proj_weight``, ``...mlp.c_fc.weight``, ...).
"""

from __future__ import annotations

import torch
from open_clip.transformer import LayerNorm, QuickGELU, Transformer
from torch import nn

from .codec import LATENT_STRIDE
from .errors import ComneckInputError
from .presets import NeckConfig


class TransformNeck(nn.Module):
    """y_hat [B, M, g, g] -> tokens [B, g*g + 1, width] (row-major positions, class token first)."""

    def __init__(self, config: NeckConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or NeckConfig()
        scale = cfg.width**-0.5
        self.trans_latent_dim = nn.Linear(cfg.latent_channels, cfg.width)
        self.class_embedding = nn.Parameter(scale * torch.randn(cfg.width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(cfg.grid * cfg.grid + 1, cfg.width))
        self.ln_pre = LayerNorm(cfg.width)
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, act_layer=QuickGELU)

    def forward(self, y_hat: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if y_hat.ndim != 4 or y_hat.shape[1] != cfg.latent_channels:
            raise ComneckInputError(
                f"neck expects latents [B, {cfg.latent_channels}, H, W], got {list(y_hat.shape)}"
            )
        if tuple(y_hat.shape[-2:]) != (cfg.grid, cfg.grid):
            side = cfg.grid * LATENT_STRIDE
            raise ComneckInputError(
                f"neck was built for a {cfg.grid}x{cfg.grid} latent grid ({side}x{side} codec input), "
                f"got {y_hat.shape[-2]}x{y_hat.shape[-1]}"
            )
        x = self.trans_latent_dim(y_hat.flatten(2).transpose(1, 2))
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        return self.transformer(self.ln_pre(x))
