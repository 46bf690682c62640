"""LLM engines: what decodes a backend's prompt embeddings into text (:mod:`.base`)."""

from __future__ import annotations

from .base import FinishReason, Generation, LLMEngine, check_context
from .hf import HFEngine

__all__ = ["FinishReason", "Generation", "HFEngine", "LLMEngine", "check_context"]
