"""Weight files in ComNeck's own layout: one safetensors state dict per network.

* codec: CompressAI's key names (``g_a.*``, ``latent_codec.*``), so a CompressAI
  ``Elic2022Chandelier`` state dict saved as safetensors loads as is;
* neck: :class:`~comneck.neck.TransformNeck` keys (the official ``llm_trans_encoder`` names);
* clip: open_clip ``CLIP`` keys (``visual.*``, ``transformer.*``, ``token_embedding.*``, ...).

Importers for the papers' released layouts convert into these files.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import ComneckInputError


def _unreadable(path: Path, what: str, exc: Exception) -> ComneckInputError:
    return ComneckInputError(f"{what} weights: {path} is not a readable safetensors file ({exc})", "bad_weights")


def check_state_file(path: str | Path, what: str) -> None:
    """Refuse a missing file or one without a safetensors header, reading only the header
    (a start-up check that does not load gigabytes twice)."""
    path = Path(path)
    if not path.is_file():
        raise ComneckInputError(f"{what} weights: no such file {path}", "bad_weights")
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError, ValueError) as exc:
        raise _unreadable(path, what, exc) from None


def read_state_dict(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, or a one-line ``bad_weights`` error naming ``what`` it was for."""
    check_state_file(path, what)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise _unreadable(Path(path), what, exc) from None


def load_into(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """``module.load_state_dict(state, strict=True)`` with a one-line error on any key or shape mismatch."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)
        raise ComneckInputError(f"{what} weights do not fit this preset: {first}", "bad_weights") from None


def save_state_dict(module: nn.Module, path: str | Path) -> None:
    """Write ``module``'s state dict as safetensors (contiguous copies; shared tensors duplicated)."""
    state = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
    save_file(state, str(path))
