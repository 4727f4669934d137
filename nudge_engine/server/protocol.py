"""The OpenAI-compatible request bodies (pydantic) and the response / chunk / error shapes.

Nudging settings are extra body fields (the openai client sends them with `extra_body=`):
`gamma`, `draft_tokens`, `resume_on_agreement`, `nudger_temperature`, `nudger_top_p`,
`nudger_top_k`; completions also take `base_prompt` (a separate prompt for the base model; `prompt`
then goes to the nudger), chat takes `response_prefix` (appended to the base model's plain
rendering of the chat, e.g. "Answer:"). Each choice reports `sources` (per token, "base" or
"nudger") and `nudged_fraction`.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

MAX_N = 128                 # choices per request (OpenAI's own limit)
MAX_PROMPTS = 64            # prompts in one completion request
MAX_STOP = 16
MAX_TOP_LOGPROBS = 20       # = nudge_engine.sampling_params.MAX_LOGPROBS
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1



def _float(default, **kw):
    return Field(default, allow_inf_nan=False, **kw)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class _Sampling(BaseModel):
    """Fields shared by both endpoints."""

    model_config = ConfigDict(extra="ignore")

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
    presence_penalty: float | None = _float(None)
    frequency_penalty: float | None = _float(None)
    logit_bias: dict[str, float] | None = None
    # vLLM-style sampling extras
    top_k: StrictInt | None = Field(None, ge=0)
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
    nudger_top_k: StrictInt | None = Field(None, ge=0)

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if len(stops) > MAX_STOP:
            raise ValueError(f"stop: at most {MAX_STOP} stop strings, got {len(stops)}")
        return stops

    def unsupported(self) -> tuple[str, str] | None:
        """(param, message) for a setting the engine cannot honour, else None."""
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                return name, f"{name} is not supported by this server"
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported by this server"
        return None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[StrictInt], list[str], list[list[StrictInt]]]
    base_prompt: Union[str, list[StrictInt], None] = None
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: StrictBool = False
    suffix: str | None = None
    best_of: StrictInt | None = None


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
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def unsupported(self) -> tuple[str, str] | None:
        found = super().unsupported()
        if found:
            return found
        if self.tools:
            return "tools", "tools are not supported by this server"
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
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def token_text(tokenizer, token_id: int) -> str:
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
