"""Weight files in ComNeck's own layout: one safetensors state dict per network.

* codec: CompressAI's key names (``g_a.*``, ``latent_codec.*``), so a CompressAI
  ``Elic2022Chandelier`` state dict saved as safetensors loads as is;
* neck: :class:`~comneck.neck.TransformNeck` keys (the official ``Linear_Encoder``'s, a release file's ``adapter``);
* clip: open_clip ``CLIP`` keys (``visual.*``, ``transformer.*``, ``token_embedding.*``, ...).

:mod:`comneck.importers` reads these and the published layouts; ``comneck convert`` writes these.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from safetensors.torch import save_file
from torch import nn


def save_state_dict(module: nn.Module, path: str | Path, keep: Callable[[str], bool] = lambda key: True) -> None:
    """Write ``module``'s state dict (the entries ``keep`` accepts) as safetensors (contiguous
    copies; shared tensors duplicated)."""
    state = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items() if keep(k)}
    save_file(state, str(path))
