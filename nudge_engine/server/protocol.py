"""The OpenAI-compatible request bodies (pydantic) and the response / chunk / error shapes.

Nudging settings are extra body fields (the openai client sends them with `extra_body=`):
`gamma`, `draft_tokens`, `resume_on_agreement`, `nudger_temperature`, `nudger_top_p`,
`nudger_top_k`; completions also take `base_prompt` (a separate prompt for the base model; `prompt`
then goes to the nudger), chat takes `response_prefix` (appended to the base model's plain
rendering of the chat, e.g. "Answer:"). Each choice reports `sources` (per token, "base" or
"nudger") and `nudged_fraction`.
"""
from __future__ import annotations

import functools
import time
import uuid
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_validator
from pydantic_core import PydanticCustomError

MAX_N = 128                 # choices per request (OpenAI's own limit)
MAX_PROMPTS = 64            # prompts in one completion request
MAX_STOP = 16
MAX_TOP_LOGPROBS = 20       # = nudge_engine.engine.sampling_params.MAX_LOGPROBS
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
TOP_K_OFF_VLLM = -1         # vLLM's "no top-k"
UNICODE_ERROR = "unicode_text"

# Fields of OpenAI's and vLLM's APIs whose effect the engine cannot give. A request that sets one to
# anything but None or its "off" value gets a 400: never silently ignored.
UNSUPPORTED_UNLESS_OFF: dict[str, tuple] = {
    "presence_penalty": (0,), "frequency_penalty": (0,), "repetition_penalty": (1,), "length_penalty": (1,),
    "logit_bias": ({},), "functions": ([],), "function_call": ("none",), "tools": ([],), "tool_choice": ("none",),
    "parallel_tool_calls": (False,), "min_tokens": (0,), "guided_json": (), "guided_regex": (),
    "guided_choice": (), "guided_grammar": (), "guided_decoding_backend": (), "structured_outputs": (),
    "use_beam_search": (False,), "bad_words": ([],), "allowed_token_ids": (), "logits_processors": ([],),
    "prompt_logprobs": (), "truncate_prompt_tokens": (),
}


def _float(default, **kw):
    return Field(default, allow_inf_nan=False, **kw)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


def printable(text: str) -> str:
    """text with anything UTF-8 cannot carry (a lone surrogate) written as a backslash escape, so an
    error message can quote what the client sent."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _lone_surrogate(value: Any, path: str) -> tuple[str, int] | None:
    """(path, code point) of the first string in a parsed JSON body that is not valid Unicode text,
    keys included (a bad key is named escaped: the path goes into the error message)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return path, ord(value[e.start])
        return None
    if isinstance(value, dict):
        for key in value:
            where = f"{path}.{printable(key)}" if path else printable(key)
            found = (_lone_surrogate(key, f"{path + '.' if path else ''}key '{printable(key)}'")
                     or _lone_surrogate(value[key], where))
            if found:
                return found
    if isinstance(value, list):
        for i, v in enumerate(value):
            found = _lone_surrogate(v, f"{path}[{i}]")
            if found:
                return found
    return None


def _is_off(value: Any, off: tuple) -> bool:
    return value is None or any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in off)


class _Sampling(BaseModel):
    """Fields shared by both endpoints."""

    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _unicode_text(cls, data: Any) -> Any:
        found = _lone_surrogate(data, "")
        if found:
            where, code = found
            raise PydanticCustomError(UNICODE_ERROR, "{where} is not valid Unicode text: a lone surrogate (U+{code})",
                                      {"where": where, "code": f"{code:04X}"})
        return data

    model: str | None = None
    n: StrictInt = Field(1, ge=1, le=MAX_N)
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: float | None = _float(None, ge=0)
    top_p: float | None = _float(None, gt=0, le=1)
    seed: StrictInt | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | list[str] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # refused unless off (UNSUPPORTED_UNLESS_OFF)
    presence_penalty: float | None = _float(None)
    frequency_penalty: float | None = _float(None)
    repetition_penalty: Any = None
    length_penalty: Any = None
    logit_bias: dict[str, float] | None = None
    functions: Any = None
    function_call: Any = None
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    min_tokens: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    guided_decoding_backend: Any = None
    structured_outputs: Any = None
    use_beam_search: Any = None
    bad_words: Any = None
    allowed_token_ids: Any = None
    logits_processors: Any = None
    prompt_logprobs: Any = None
    truncate_prompt_tokens: Any = None
    # vLLM-style sampling extras
    top_k: StrictInt | None = Field(None, ge=TOP_K_OFF_VLLM)
    min_p: float | None = _float(None, ge=0, le=1)
    ignore_eos: StrictBool = False
    stop_token_ids: list[StrictInt] | None = None
    include_stop_str_in_output: StrictBool = False
    # nudging
    gamma: float | None = _float(None, ge=0)
    draft_tokens: StrictInt | None = Field(None, ge=0, le=64)
    resume_on_agreement: StrictBool | None = None
    nudger_temperature: float | None = _float(None, ge=0)
    nudger_top_p: float | None = _float(None, gt=0, le=1)
    nudger_top_k: StrictInt | None = Field(None, ge=TOP_K_OFF_VLLM)

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if len(stops) > MAX_STOP:
            raise ValueError(f"stop: at most {MAX_STOP} stop strings, got {len(stops)}")
        return stops

    def unsupported(self) -> tuple[str, str] | None:
        """(param, message) for a setting the engine cannot honour, else None."""
        for name, off in UNSUPPORTED_UNLESS_OFF.items():
            if not _is_off(getattr(self, name, None), off):
                return name, f"{name} is not supported by this server (the engine cannot honour it; leave it out)"
        return None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[StrictInt], list[str], list[list[StrictInt]]]
    base_prompt: Union[str, list[StrictInt], None] = None
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: StrictBool = False
    suffix: str | None = None
    best_of: StrictInt | None = None
    max_completion_tokens: Any = None     # a chat field: refused here rather than ignored

    def unsupported(self) -> tuple[str, str] | None:
        found = super().unsupported()
        if found:
            return found
        if self.max_completion_tokens is not None:
            return "max_completion_tokens", "max_completion_tokens belongs to chat completions; use max_tokens"
        if self.suffix:
            return "suffix", "suffix is not supported by this server"
        if self.best_of not in (None, 1, self.n):
            return "best_of", "best_of is not supported by this server (use n)"
        if self.echo and self.base_prompt is not None:
            return "echo", "echo with base_prompt is ambiguous (two prompts); send one prompt"
        return None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: Union[str, list[TextPart], None] = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for p in self.content:
            if p.type != "text" or p.text is None:
                raise ValueError(f"message content parts of type {p.type!r} are not supported (text only)")
            parts.append(p.text)
        return "".join(parts)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_prefix: str | None = None
    chat_template: str | None = None
    response_format: dict[str, Any] | None = None

    def unsupported(self) -> tuple[str, str] | None:
        found = super().unsupported()
        if found:
            return found
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            return "response_format", "only response_format {\"type\": \"text\"} is supported"
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs", "top_logprobs needs logprobs: true"
        return None


# ---------------------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict:
    """The OpenAI error shape. Message and param may quote what the client sent: escaped so that the body
    is always valid UTF-8 JSON (a lone surrogate quoted raw would turn a 400 into a 500)."""
    return {"error": {"message": printable(message), "type": type, "param": None if param is None else printable(param),
                      "code": code}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@functools.lru_cache(maxsize=1 << 16)
def token_text(tokenizer, token_id: int) -> str:
    """One token's text; cached, since logprobs responses name the same tokens many times."""
    return tokenizer.decode([token_id], skip_special_tokens=False)


def _top(entry: dict[int, float], n: int) -> list[tuple[int, float]]:
    return sorted(entry.items(), key=lambda kv: -kv[1])[:n]


def completion_logprobs(tokenizer, token_ids: list[int], logprobs: list[dict[int, float]] | None, n: int,
                        offset: int) -> tuple[dict, int]:
    """The legacy completions logprobs object; returns it and the text offset after it."""
    tokens, token_lps, tops, offsets = [], [], [], []
    for tid, entry in zip(token_ids, logprobs or []):
        text = token_text(tokenizer, tid)
        tokens.append(text)
        token_lps.append(entry.get(tid))
        tops.append({token_text(tokenizer, t): lp for t, lp in _top(entry, n)} if n > 0 else None)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}, offset


def join_completion_logprobs(first: dict, second: dict) -> dict:
    return {key: first[key] + second[key] for key in first}


def chat_logprobs(tokenizer, token_ids: list[int], logprobs: list[dict[int, float]] | None, n: int) -> dict:
    content = []
    for tid, entry in zip(token_ids, logprobs or []):
        text = token_text(tokenizer, tid)
        content.append({
            "token": text, "logprob": entry.get(tid), "bytes": list(text.encode("utf-8")),
            "top_logprobs": [{"token": (t := token_text(tokenizer, i)), "logprob": lp, "bytes": list(t.encode("utf-8"))}
                             for i, lp in _top(entry, n)],
        })
    return {"content": content}


def nudged_fraction(sources: list[str]) -> float:
    return sum(s == "nudger" for s in sources) / max(len(sources), 1)


FinishReason = Literal["stop", "length", "abort"]
