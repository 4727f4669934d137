"""The shared output text of a cross-tokenizer request: bytes written in spans, one writer each.

Each model's context is its prompt, its own spans as the tokens it emitted, and the other model's
spans converted word by word (NUDGING.md section 7). `covered[m]` is how many bytes of the text
model m's context holds; it only grows, and it always sits on a piece boundary, so converting the
text after it piece by piece gives exactly the tokens a conversion of the whole span would.
"""
from __future__ import annotations

import codecs
from dataclasses import dataclass, field

from .wordpieces import WHITESPACE, WordPieces

BASE, NUDGER = 0, 1            # model index = writer index = Source value
WRITER_NAMES = ("base", "nudger")


@dataclass
class Span:
    writer: int
    start: int                 # byte offsets into SpanText.data
    end: int


@dataclass
class SpanText:
    data: bytearray = field(default_factory=bytearray)
    spans: list[Span] = field(default_factory=list)
    covered: list[int] = field(default_factory=lambda: [0, 0])   # [model] bytes in that model's context

    def write(self, writer: int, data: bytes) -> None:
        # A model writes only once it has read everything: its own tokens then cover the new bytes.
        assert self.covered[writer] == len(self.data), "a model writes only after reading the other's text"
        if not self.spans or self.spans[-1].writer != writer:
            self.spans.append(Span(writer, len(self.data), len(self.data)))
        self.data += data
        self.spans[-1].end = self.covered[writer] = len(self.data)

    def unread_end(self, model: int, through_end: bool) -> int:
        """End of what `model` may read now: all text (the span is closed, or the next byte starts a
        word), or else up to the start of the unfinished last word."""
        start = self.covered[model]
        if through_end:
            return len(self.data)
        for i in range(len(self.data) - 1, start, -1):
            if self.data[i] in WHITESPACE:
                return i
        return start

    def read(self, model: int, wp: WordPieces, through_end: bool) -> tuple[list[int], int]:
        """Converts the other model's new finished words for `model` and marks them read.
        -> (tokens, bytes read)."""
        start, end = self.covered[model], self.unread_end(model, through_end)
        self.covered[model] = end
        return wp.encode(bytes(self.data[start:end])), end - start

    def writer_spans(self, limit: int | None = None) -> list[tuple[int, bytes]]:
        end = len(self.data) if limit is None else limit
        return [(s.writer, bytes(self.data[s.start:min(s.end, end)])) for s in self.spans if s.start < end]


def decode_spans(spans: list[tuple[int, bytes]]) -> list[tuple[str, str]]:
    """[(writer, bytes)] -> [(text, "base" | "nudger")], one incremental UTF-8 decode over all of
    them, so the texts join to the full text: a character cut by a span boundary is held back and
    belongs to the span where it completes; bytes that never form one become U+FFFD at the end."""
    dec = codecs.getincrementaldecoder("utf-8")("replace")
    out = [(dec.decode(data), WRITER_NAMES[w]) for w, data in spans]
    tail = dec.decode(b"", final=True)
    if tail:
        text, name = out[-1]
        out[-1] = (text + tail, name)
    return out
