"""LLM engines: what decodes a backend's prompt embeddings into text (:mod:`.base`)."""

from __future__ import annotations

from .base import FinishReason, Generation, LLMEngine, PromptEmbedder, Run, check_context, runs
from .hf import HFEngine

__all__ = ["FinishReason", "Generation", "HFEngine", "LLMEngine", "PromptEmbedder", "Run", "check_context", "runs"]
