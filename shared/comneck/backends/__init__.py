"""Downstream models behind one protocol (:mod:`.base`), by name.

``BACKENDS`` maps a name to a factory taking the loaded :class:`~comneck.models.ComneckModels`.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import ComneckInputError
from ..models import ComneckModels
from .base import TASKS, Backend, BackendAnswer, ClipTap, GenerationOptions
from .clip_zero_shot import ClipZeroShot


def _clip_zero_shot(models: ComneckModels) -> Backend:
    return ClipZeroShot(models.clip_model, random_weights=models.random_weights)


BACKENDS: dict[str, Callable[[ComneckModels], Backend]] = {
    "clip-zero-shot": _clip_zero_shot,
}


def check_backend_names(names: list[str]) -> list[str]:
    """Validate backend names (one-line error listing the known ones)."""
    unknown = [name for name in names if name not in BACKENDS]
    if unknown:
        raise ComneckInputError(f"unknown backend {unknown[0]!r}; known: {', '.join(BACKENDS)}", "unknown_backend")
    if not names:
        raise ComneckInputError("load at least one backend", "unknown_backend")
    return names


__all__ = ["BACKENDS", "TASKS", "Backend", "BackendAnswer", "ClipTap", "GenerationOptions", "check_backend_names"]
