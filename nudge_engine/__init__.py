"""nudge_engine: exact, fast nudging (a base model writes; a small aligned model writes where it is unsure)."""
from .errors import ModelFolderError
from .scoring import load_model

__all__ = ["ModelFolderError", "load_model"]
