"""One cross-tokenizer request: the shared text in spans, each model's tokens, the handoff state."""
from __future__ import annotations

import codecs
import time
from dataclasses import dataclass, field

import torch

from ..engine.draft_policy import DraftStats
from ..engine.request import Mode, RequestOutput, StreamDelta
from ..engine.sampling_params import SamplingParams
from .spans import BASE, WRITER_NAMES, SpanText, decode_spans


@dataclass
class ReadWork:
    """One read of the other model's text: what was converted, and what the reader computed for it."""
    model: str                # the reader
    text_bytes: int           # bytes of new text read
    converted_tokens: int     # tokens appended to the reader's context for it
    computed_tokens: int = 0  # tokens the reader's forward computed in that pass (pending included)


@dataclass
class CrossRequestOutput(RequestOutput):
    # token_ids / sources: the base model's tokens of the output text and who wrote each.
    spans: list[tuple[str, str]] = field(default_factory=list)       # (text, "base" | "nudger")
    work: list[ReadWork] = field(default_factory=list)
    computed_tokens: dict[str, int] = field(default_factory=dict)    # per model, whole request
    # With logprobs (text_logprobs.py): per written token, in text order; `logprobs` is keyed likewise.
    logprob_token_ids: list[int] | None = None                       # joint ids (nudger's offset)


@dataclass
class CrossRequest:
    id: int
    params: SamplingParams
    gamma: float
    draft_tokens: int
    resume_on_agreement: bool
    prompts: tuple[list[int], list[int]]                # [model]
    seqs: tuple                                         # [model] _core.Sequence
    nudger_params: SamplingParams = None                # the nudger's own sampling settings
    seed: int = 0                                       # the request's seed, or one drawn for it
    base_gen: torch.Generator = None                    # one draw per base-written token (text_sampling.py)
    nudger_gen: torch.Generator = None                  # reseeded at every nudge run
    nudge_runs: int = 0
    adaptive_drafting: bool = False
    draft_stats: DraftStats = field(default_factory=DraftStats)
    planned_drafts: int = 0                             # BASE-mode drafts this round (the policy's pick)
    written: list | None = None        # with logprobs: (text offset, nbytes, joint id, entry) per written token
    queue_lp: list = field(default_factory=list)        # with logprobs: the queue's entries (joint id, entry)
    prompt_logprobs: list | None = None                 # the base's, [None] first, when asked for
    streamed_written: int = 0
    text: SpanText = field(default_factory=SpanText)
    mode: Mode = Mode.BASE
    run: int = 0
    base_out: list[int] = field(default_factory=list)   # base context after the prompt (committed)
    base_src: list[int] = field(default_factory=list)   # writer of each
    stable: int = 0           # nudger tokens that are final context; after them: queue or scratch
    queue: list[int] = field(default_factory=list)      # NUDGE: nudger's drafted tokens, undecided
    started: bool = False     # nudger prompt appended (lazily, at its first use)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    text_limit: int | None = None                       # bytes of text kept (stop string / length cut)
    final_tokens: list[int] | None = None
    final_sources: list[int] | None = None
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    work: list[ReadWork] = field(default_factory=list)
    open_read: list = field(default_factory=lambda: [None, None])  # [model] ReadWork awaiting its pass
    computed: list[int] = field(default_factory=lambda: [0, 0])
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    finish_time: float | None = None
    streamed_tokens: int = 0
    streamed_bytes: int = 0
    decoder: object = None
    error: str | None = None                            # set with finish_reason "error"

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def abort(self) -> None:
        self.finish_reason = self.finish_reason or "abort"

    def fail(self, message: str) -> None:
        """Ends the request alone after its own work raised; its output so far is kept."""
        self.finish_reason, self.error = "error", message
        self.finish_time = time.monotonic()

    @property
    def text_end(self) -> int:
        return len(self.text.data) if self.text_limit is None else self.text_limit

    def written_until(self, end: int) -> list:
        """Entries (start, nbytes, joint id, entry) of tokens that start before the text's end (a
        token without text, such as an end token, at the end too)."""
        if self.written is None:
            return []
        return [w for w in self.written if w[0] < end or (w[1] == 0 and w[0] == end)]

    def tokens(self) -> tuple[list[int], list[int]]:
        if self.final_tokens is not None:
            return self.final_tokens, self.final_sources
        return self.base_out, self.base_src

    def result(self) -> CrossRequestOutput:
        end = self.text_end
        tokens, sources = self.tokens()
        return CrossRequestOutput(
            request_id=self.id, prompt_token_ids=list(self.prompts[BASE]), token_ids=list(tokens),
            text=bytes(self.text.data[:end]).decode("utf-8", "replace"),
            sources=[WRITER_NAMES[s] for s in sources], finish_reason=self.finish_reason,
            stop_reason=self.stop_reason, prompt_logprobs=self.prompt_logprobs, rounds=self.rounds,
            logprobs=None if self.written is None else [w[3] for w in self.written_until(end)],
            logprob_token_ids=None if self.written is None else [w[2] for w in self.written_until(end)],
            drafted_tokens=self.drafted, accepted_tokens=self.accepted, arrival_time=self.arrival_time,
            first_token_time=self.first_token_time, finish_time=self.finish_time,
            spans=decode_spans(self.text.writer_spans(end)), work=list(self.work),
            computed_tokens=dict(zip(WRITER_NAMES, self.computed)), error=self.error,
        )

    def take_delta(self) -> StreamDelta:
        """What a stream has not seen: committed base tokens, and text held back while a character
        is incomplete (flushed as U+FFFD only when the request ends)."""
        tokens, sources = self.tokens()
        new = slice(self.streamed_tokens, len(tokens))
        self.streamed_tokens = len(tokens)
        if self.decoder is None:
            self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        end = self.text_end
        text = self.decoder.decode(bytes(self.text.data[self.streamed_bytes:end]), final=self.finished)
        self.streamed_bytes = max(self.streamed_bytes, end)
        written = self.written_until(end)[self.streamed_written:]
        self.streamed_written += len(written)
        lp = None if self.written is None else [w[3] for w in written]
        return StreamDelta(self.id, tokens[new], text, [WRITER_NAMES[s] for s in sources[new]], lp,
                           self.finish_reason, self.stop_reason,
                           logprob_token_ids=None if lp is None else [w[2] for w in written])

    def observe_drafts(self, drafted: int, accepted: int, rejected: bool) -> None:
        """Acceptance history for adaptive drafting (a switch to nudging rejects nothing)."""
        if drafted == 0:
            self.draft_stats.rounds_without_draft += 1
            return
        self.draft_stats.rounds_without_draft = 0
        self.draft_stats.observe(accepted, int(rejected))

    def draft_count(self) -> int:
        """BASE mode: the drafts planned for this round; NUDGE mode: the nudger writes >= 1 token."""
        if self.mode == Mode.BASE:
            return self.planned_drafts
        return max(self.draft_tokens, 1)
