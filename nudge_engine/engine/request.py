"""One request's state across rounds, its stop checks, and the result users read."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import IntEnum
from functools import cached_property

import torch

from .draft_policy import DraftStats
from .sampling_params import SamplingParams
from ..model.tokenizer import IncrementalDetokenizer

SOURCE_NAMES = ("base", "nudger")


class RequestFailedError(RuntimeError):
    """A request's own work raised; the request ended alone (the engine and other requests go on)."""


class Mode(IntEnum):
    BASE = 0
    NUDGE = 1


class Source(IntEnum):
    BASE = 0
    NUDGER = 1


@dataclass
class RequestOutput:
    request_id: int
    prompt_token_ids: list[int]                  # the base model's prompt
    token_ids: list[int]
    text: str
    sources: list[str]                           # "base" | "nudger" per emitted token
    finish_reason: str | None                    # "stop" | "length" | "abort" | "error" | None while running
    stop_reason: str | int | None                # the matched stop string or token id
    logprobs: list[dict[int, float]] | None      # per emitted token: {token id: logprob}, emitted first
    prompt_logprobs: list[dict[int, float] | None] | None
    rounds: int
    drafted_tokens: int
    accepted_tokens: int
    arrival_time: float
    first_token_time: float | None
    finish_time: float | None
    error: str | None = None                     # why the request failed (finish_reason "error")

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def nudged_fraction(self) -> float:
        return sum(s == "nudger" for s in self.sources) / max(len(self.sources), 1)


@dataclass
class StreamDelta:
    request_id: int
    token_ids: list[int]
    text: str
    sources: list[str]
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None
    stop_reason: str | int | None
    # The text path's logprobs are per written token, not per token_ids (pairing/text_logprobs.py).
    logprob_token_ids: list[int] | None = None


@dataclass
class Request:
    id: int
    base_prompt: list[int]
    nudger_prompt: list[int] | None
    params: SamplingParams
    nudger_params: SamplingParams
    gamma: float
    draft_tokens: int
    adaptive_drafting: bool
    resume_on_agreement: bool
    eos_ids: frozenset[int]
    detok: IncrementalDetokenizer
    generator: torch.Generator
    base_seq: object = None        # _core.Sequence
    nudger_seq: object = None      # _core.Sequence or None
    mode: Mode = Mode.BASE
    run: int = 0
    output: list[int] = field(default_factory=list)
    sources: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
    prompt_logprobs: list[dict[int, float] | None] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    draft_stats: DraftStats = field(default_factory=DraftStats)
    planned_drafts: int = 0        # this round's draft count, decided before scheduling
    lookahead: int | None = None   # the draft count the scheduler last reserved slots for
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    finish_time: float | None = None
    emitted_upto: int = 0          # output tokens already handed to a stream
    emitted_text_upto: int = 0
    error: str | None = None       # set with finish_reason "error"

    @cached_property
    def greedy(self) -> bool:   # the parameters never change after admission
        return self.params.greedy and self.nudger_params.greedy

    def add_tokens(self, tokens: list[int], sources: list[int], logprobs: list[dict[int, float]] | None) -> None:
        """Appends decided tokens, stopping at the first stop condition (NUDGING.md section 4).

        Without stop strings no text is needed to decide a stop, so the tokens go to the detokenizer
        unread (it decodes when the text is read: result(), take_delta()); with stop strings each
        token's text is decoded as it comes."""
        if not tokens:
            return
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()
        p = self.params
        if p.stop:
            return self._add_tokens_with_stop_strings(tokens, sources, logprobs)
        n = min(len(tokens), p.max_tokens - len(self.output))
        stop = None
        eos = () if p.ignore_eos else self.eos_ids
        for i in range(n):
            tok = tokens[i]
            if tok in eos or tok in p.stop_token_ids:
                n, stop = i + 1, tok
                break
        kept = tokens if n == len(tokens) else tokens[:n]
        self.output.extend(kept)
        self.sources.extend(sources if n == len(sources) else sources[:n])
        if self.logprobs is not None and logprobs is not None:
            self.logprobs.extend(logprobs[:n])
        self.detok.push(kept)
        if stop is not None:
            self._finish("stop", stop)
        elif len(self.output) >= p.max_tokens:
            self._finish("length", None)

    def _add_tokens_with_stop_strings(self, tokens, sources, logprobs) -> None:
        p = self.params
        for i, (tok, src) in enumerate(zip(tokens, sources)):
            self.output.append(tok)
            self.sources.append(src)
            if self.logprobs is not None and logprobs is not None:
                self.logprobs.append(logprobs[i])
            self.detok.add(tok)
            if not p.ignore_eos and tok in self.eos_ids:
                return self._finish("stop", tok)
            if tok in p.stop_token_ids:
                return self._finish("stop", tok)
            if self._check_stop_strings():
                return
            if len(self.output) >= p.max_tokens:
                return self._finish("length", None)

    def _check_stop_strings(self) -> bool:
        text = self.detok.text
        # Only the tail can hold a new match: the longest stop plus the newest piece.
        window = max(len(s) for s in self.params.stop) + 16
        start = max(0, len(text) - window)
        for stop in self.params.stop:
            at = text.find(stop, start)
            if at >= 0:
                cut = at + len(stop) if self.params.include_stop_str_in_output else at
                self.detok.text = text[:cut]
                self._finish("stop", stop)
                return True
        return False

    def _finish(self, reason: str, stop_reason: str | int | None) -> None:
        self.finish_reason = reason
        self.stop_reason = stop_reason
        self.finish_time = time.monotonic()
        if reason == "length" or (reason == "stop" and isinstance(stop_reason, int)):
            self.detok.close()   # decoded with the queued tokens when the text is read

    def abort(self) -> None:
        self._finish("abort", None)

    def fail(self, message: str) -> None:
        """Ends the request alone after its own work raised; its output so far is kept."""
        self.error = message
        self._finish("error", None)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def result(self) -> RequestOutput:
        return RequestOutput(
            request_id=self.id, prompt_token_ids=list(self.base_prompt), token_ids=list(self.output),
            text=self.detok.text, sources=[SOURCE_NAMES[s] for s in self.sources],
            finish_reason=self.finish_reason, stop_reason=self.stop_reason,
            logprobs=self.logprobs, prompt_logprobs=self.prompt_logprobs,
            rounds=self.rounds, drafted_tokens=self.drafted, accepted_tokens=self.accepted,
            arrival_time=self.arrival_time, first_token_time=self.first_token_time, finish_time=self.finish_time,
            error=self.error,
        )

    def take_delta(self) -> StreamDelta:
        """What a stream has not seen yet. Text that may still turn out to start a stop string is held
        back, so a stream never shows text the final result cuts."""
        new = slice(self.emitted_upto, len(self.output))
        upto = len(self.detok.text)
        if not self.finished:
            upto -= _stop_prefix_len(self.detok.text, self.params.stop)
        text = self.detok.text[self.emitted_text_upto:upto]
        self.emitted_upto = len(self.output)
        self.emitted_text_upto = max(self.emitted_text_upto, upto)
        return StreamDelta(self.id, self.output[new], text, [SOURCE_NAMES[s] for s in self.sources[new]],
                           self.logprobs[new] if self.logprobs is not None else None,
                           self.finish_reason, self.stop_reason)


def _stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that is the beginning of some stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best
