"""Weight files in ComNeck's own layout: one safetensors state dict per network.

* codec: CompressAI's key names (``g_a.*``, ``latent_codec.*``), so a CompressAI
  ``Elic2022Chandelier`` state dict saved as safetensors loads as is;
* neck: :class:`~comneck.neck.TransformNeck` keys (the official ``Linear_Encoder``'s, a release file's ``adapter``);
* clip: open_clip ``CLIP`` keys (``visual.*``, ``transformer.*``, ``token_embedding.*``, ...).

:mod:`comneck.importers` reads these and the published layouts; :mod:`comneck.weights_folder` gathers
them into the folders ``comneck convert`` and training exports write.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn


def save_state_dict(weights: nn.Module | Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Write a module's state dict, or a state dict, as safetensors (contiguous CPU copies;
    shared tensors duplicated)."""
    state = weights.state_dict() if isinstance(weights, nn.Module) else weights
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in state.items()}, str(path))


def fsync_path(path: str | Path) -> None:
    """Flush a file, or a folder's entries, to disk: what makes a write-then-rename durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
