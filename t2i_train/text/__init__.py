"""Frozen text encoder (Gemma-2) and the text-embedding cache."""
from .gemma import CHI_PROMPT, GemmaTextEncoder

__all__ = ["CHI_PROMPT", "GemmaTextEncoder"]
