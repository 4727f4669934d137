"""nudge_engine: exact, fast nudging (a base model writes; a small aligned model writes where it is unsure)."""
from .engine import NudgeEngine
from .errors import ModelFolderError
from .request import RequestOutput, StreamDelta
from .sampling_params import NudgeParams, SamplingParams
from .scoring import load_model

__all__ = ["NudgeEngine", "NudgeParams", "SamplingParams", "RequestOutput", "StreamDelta", "ModelFolderError",
           "load_model"]
