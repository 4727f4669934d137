"""Per-request parameters: SamplingParams (as in vLLM) and NudgeParams (the handoff's settings)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

GREEDY = 0.0
MAX_LOGPROBS = 20


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def _finite(name: str, value: float) -> None:
    _check(isinstance(value, (int, float)) and math.isfinite(value), f"{name} must be a finite number, got {value!r}")


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0     # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0               # 0 = all tokens
    min_p: float = 0.0
    seed: int | None = None      # per request: same seed, same output, whatever is batched with it
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None          # top-n logprobs per emitted token
    prompt_logprobs: int | None = None   # top-n logprobs per prompt token (base model)
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        _check(isinstance(self.max_tokens, int) and self.max_tokens >= 1, f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        _finite("temperature", self.temperature)
        _check(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        _finite("top_p", self.top_p)
        _check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        _check(isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        _finite("min_p", self.min_p)
        _check(0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}")
        _check(self.seed is None or isinstance(self.seed, int), f"seed must be an integer, got {self.seed!r}")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop must be non-empty strings")
        _check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids must be token ids >= 0")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            _check(v is None or (isinstance(v, int) and 0 <= v <= MAX_LOGPROBS), f"{name} must be in [0, {MAX_LOGPROBS}], got {v!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == GREEDY


@dataclass
class NudgeParams:
    """None = the engine's default. The nudger's own sampling settings default to the base's."""

    gamma: float | None = None
    draft_tokens: int | None = None              # the most a round drafts (0: lazy catch-up, never speculate)
    adaptive_drafting: bool | None = None        # pick fewer drafts in rounds where they do not pay
    resume_on_agreement: bool | None = None
    nudger_temperature: float | None = None
    nudger_top_p: float | None = None
    nudger_top_k: int | None = None
    nudger_min_p: float | None = None

    def __post_init__(self) -> None:
        if self.gamma is not None:
            _finite("gamma", self.gamma)
            _check(self.gamma >= 0, f"gamma must be >= 0, got {self.gamma}")
        if self.draft_tokens is not None:
            _check(isinstance(self.draft_tokens, int) and 0 <= self.draft_tokens <= 64,
                   f"draft_tokens must be an integer in [0, 64], got {self.draft_tokens!r}")

    def nudger_sampling(self, base: SamplingParams) -> SamplingParams:
        def pick(mine, theirs):
            return theirs if mine is None else mine
        return SamplingParams(
            max_tokens=base.max_tokens,
            temperature=pick(self.nudger_temperature, base.temperature),
            top_p=pick(self.nudger_top_p, base.top_p),
            top_k=pick(self.nudger_top_k, base.top_k),
            min_p=pick(self.nudger_min_p, base.min_p),
        )
