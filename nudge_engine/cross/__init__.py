"""Nudging across tokenizer families (NUDGING.md section 7): wordpieces.py, spans.py, engine.py."""
