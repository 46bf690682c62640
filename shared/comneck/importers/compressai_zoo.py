"""mbt2018-mean weights as CompressAI's model zoo publishes them, onto our latent-codec form.

The zoo's ``mbt2018-mean-{quality}-{hash}.pth.tar`` files are ``MeanScaleHyperprior`` state dicts
(``g_a``, ``g_s``, ``h_a``, ``h_s``, ``entropy_bottleneck``, ``gaussian_conditional``), some with
the entropy bottleneck's parameters under their pre-1.2 names. ``comneck.codec`` holds the same
layers as CompressAI latent codecs, so the keys map one to one: ``h_a``, ``h_s`` and
``entropy_bottleneck`` go under ``latent_codec.hyper``, ``gaussian_conditional`` under
``latent_codec.y``. Entropy tables are rebuilt, as for every codec (:mod:`comneck.importers.elic`).
"""

from __future__ import annotations

import torch
from compressai.models.utils import remap_old_keys
from compressai.zoo.pretrained import load_pretrained

_HYPER_PARTS = ("h_a.", "h_s.", "entropy_bottleneck.")


def is_zoo_mean_scale_hyperprior(state: dict[str, torch.Tensor]) -> bool:
    """A flat MeanScaleHyperprior-style state dict (hyper networks at the top, no ELIC context nets)."""
    return "g_a.0.weight" in state and "h_s.0.weight" in state and any(k.startswith("gaussian_conditional.") for k in state)


def from_zoo_mean_scale_hyperprior(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Zoo keys -> our mbt2018-mean keys, old entropy-bottleneck names renamed as CompressAI's own loader does."""
    current = remap_old_keys("entropy_bottleneck", load_pretrained(state))
    out: dict[str, torch.Tensor] = {}
    for key, value in current.items():
        if key.startswith(_HYPER_PARTS):
            key = f"latent_codec.hyper.{key}"
        elif key.startswith("gaussian_conditional."):
            key = f"latent_codec.y.{key}"
        out[key] = value
    return out
