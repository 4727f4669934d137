"""The text path's output text: writing a token, stop conditions, the length in base tokens, the
final cut (NUDGING.md section 7; the rules fixed in pairing/text.py's docstring).

TextStops is a part of TextPairing: it reads the pairing's word pieces (`wp`), each model's EOS
(`eos`) and `nudger_context_limit`.
"""
from __future__ import annotations

import time

from .spans import BASE, NUDGER
from .text_request import CrossRequest


class TextStops:
    def _write(self, req: CrossRequest, writer: int, token: int) -> None:
        if req.first_token_time is None:
            req.first_token_time = time.monotonic()
        req.text.write(writer, self.wp[writer].token_bytes[token])
        if writer == BASE:
            req.base_out.append(token)
            req.base_src.append(BASE)
        p = req.params
        if not p.ignore_eos and token in self.eos[writer]:
            return self._stop(req, "stop", token)
        if writer == BASE and token in p.stop_token_ids:
            return self._stop(req, "stop", token)
        if p.stop and self._stop_string(req):
            return
        if self._count(req) >= p.max_tokens or self._nudger_context(req) >= self.nudger_context_limit:
            return self._stop(req, "length", None)

    def _tail_tokens(self, req: CrossRequest) -> list[int]:
        """Base tokens of the nudger's text the base has not read yet (its last word as it stands)."""
        return self.wp[BASE].encode(bytes(req.text.data[req.text.covered[BASE]:]))

    def _count(self, req: CrossRequest) -> int:
        """Base tokens of the output text. Every converted token holds >= 1 byte, so the tail is
        converted only when its bytes could reach max_tokens (keeps long nudged runs linear)."""
        tail = len(req.text.data) - req.text.covered[BASE]
        if len(req.base_out) + tail < req.params.max_tokens:
            return len(req.base_out) + tail
        return len(req.base_out) + len(self._tail_tokens(req))

    def _nudger_context(self, req: CrossRequest) -> int:
        """Tokens in the nudger's context as of now (the base's unread text converted), bounded first
        by bytes so the conversion runs only near the limit."""
        read = req.stable if req.started else len(req.prompts[NUDGER])
        unread = req.text.data[req.text.covered[NUDGER]:]
        if read + len(unread) < self.nudger_context_limit:
            return read + len(unread)
        return read + len(self.wp[NUDGER].encode(bytes(unread)))

    def _stop_string(self, req: CrossRequest) -> bool:
        data = req.text.data
        stops = [s.encode("utf-8") for s in req.params.stop]
        start = max(0, len(data) - max(map(len, stops)) - 64)
        for s, raw in zip(req.params.stop, stops):
            at = data.find(raw, start)
            if at >= 0:
                req.text_limit = at + len(raw) if req.params.include_stop_str_in_output else at
                self._stop(req, "stop", s)
                return True
        return False

    def _stop(self, req: CrossRequest, reason: str, stop_reason) -> None:
        req.finish_reason, req.stop_reason = reason, stop_reason
        req.finish_time = time.monotonic()
        tail = self._tail_tokens(req)
        tokens, sources = req.base_out + tail, req.base_src + [NUDGER] * len(tail)
        if reason == "length" and len(tokens) > req.params.max_tokens:
            tokens, sources = tokens[:req.params.max_tokens], sources[:req.params.max_tokens]
            req.text_limit = len(self.wp[BASE].bytes_of(tokens))
        req.final_tokens, req.final_sources = tokens, sources
