"""Downstream models behind one protocol (:mod:`.base`), registered by name (:mod:`.registry`)."""

from __future__ import annotations

from .base import (MAX_CHOICES, MAX_SUPPORT, TASKS, Backend, BackendAnswer, BackendContext, BackendSpec, ClipRequirement,
                   FewShotBackend, GenerationOptions, ImageInfo, SupportExample, check_choices, check_support_labels)
from .registry import BACKENDS, check_backend, get_spec, load_backend, parse_backend_arg

__all__ = [
    "BACKENDS", "TASKS", "Backend", "BackendAnswer", "BackendContext", "BackendSpec", "ClipRequirement",
    "FewShotBackend", "GenerationOptions", "ImageInfo", "MAX_CHOICES", "MAX_SUPPORT", "SupportExample", "check_backend",
    "check_choices", "check_support_labels", "get_spec", "load_backend", "parse_backend_arg",
]
