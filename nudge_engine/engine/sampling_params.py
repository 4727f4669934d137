"""Per-request parameters: SamplingParams (as in vLLM) and NudgeParams (the handoff's settings)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

GREEDY = 0.0
MAX_LOGPROBS = 20
# Below this temperature a request is greedy, as in vLLM: 1 / temperature overflows float32 near 3e-39,
# and long before that the distribution is one-hot in float32 anyway.
SAMPLING_EPS = 1e-5
TOP_K_OFF = 0
MAX_DRAFT_TOKENS = 64
TOP_K_OFF_VLLM = -1   # vLLM's spelling of "off"; taken as TOP_K_OFF


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def _finite(name: str, value: float) -> None:
    _check(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
           f"{name} must be a finite number, got {value!r}")


def _check_sampling(prefix: str, temperature, top_p, top_k, min_p) -> None:
    """The same rules for the base's settings and the nudger's `nudger_*` twins (None = not given)."""
    if temperature is not None:
        _finite(prefix + "temperature", temperature)
        _check(temperature >= 0, f"{prefix}temperature must be >= 0, got {temperature}")
    if top_p is not None:
        _finite(prefix + "top_p", top_p)
        _check(0 < top_p <= 1, f"{prefix}top_p must be in (0, 1], got {top_p}")
    if top_k is not None:
        _check(isinstance(top_k, int) and not isinstance(top_k, bool) and top_k >= TOP_K_OFF_VLLM,
               f"{prefix}top_k must be an integer >= 0 (0 or -1 = off), got {top_k!r}")
    if min_p is not None:
        _finite(prefix + "min_p", min_p)
        _check(0 <= min_p <= 1, f"{prefix}min_p must be in [0, 1], got {min_p}")


def _normal_temperature(t: float) -> float:
    return GREEDY if t < SAMPLING_EPS else float(t)


def _normal_top_k(k: int) -> int:
    return TOP_K_OFF if k == TOP_K_OFF_VLLM else k


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0     # 0 (or below SAMPLING_EPS) = greedy
    top_p: float = 1.0           # however small, the top token is kept
    top_k: int = 0               # 0 (or -1) = all tokens
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
        _check_sampling("", self.temperature, self.top_p, self.top_k, self.min_p)
        self.temperature = _normal_temperature(self.temperature)
        self.top_k = _normal_top_k(self.top_k)
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
            _check(isinstance(self.draft_tokens, int) and 0 <= self.draft_tokens <= MAX_DRAFT_TOKENS,
                   f"draft_tokens must be an integer in [0, {MAX_DRAFT_TOKENS}], got {self.draft_tokens!r}")
        _check_sampling("nudger_", self.nudger_temperature, self.nudger_top_p, self.nudger_top_k, self.nudger_min_p)

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
