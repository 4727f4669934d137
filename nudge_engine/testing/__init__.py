"""Tiny random Hugging Face-style models and tokenizers for tests, the demo and benchmarks.

May import: model/ (the tokenizer, to check what it writes). Nothing in engine/, pairing/ or server/
imports testing/.
"""
from nudge_engine.testing.model_factory import DEFAULT_PEAKINESS, FAMILIES, make_tiny_model, make_tiny_pair
from nudge_engine.testing.tokenizer_factory import STYLES, make_tokenizer

__all__ = ["DEFAULT_PEAKINESS", "FAMILIES", "STYLES", "make_tiny_model", "make_tiny_pair", "make_tokenizer"]
