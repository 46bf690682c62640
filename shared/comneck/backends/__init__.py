"""Downstream models behind one protocol (:mod:`.base`), registered by name (:mod:`.registry`)."""

from __future__ import annotations

from .base import (MAX_CHOICES, TASKS, Backend, BackendAnswer, BackendContext, BackendSpec, ClipRequirement, GenerationOptions,
                   ImageInfo, check_choices)
from .registry import BACKENDS, check_backend, get_spec, load_backend, parse_backend_arg

__all__ = [
    "BACKENDS", "TASKS", "Backend", "BackendAnswer", "BackendContext", "BackendSpec", "ClipRequirement",
    "GenerationOptions", "ImageInfo", "MAX_CHOICES", "check_backend", "check_choices", "get_spec", "load_backend", "parse_backend_arg",
]
