"""Slow obvious reference for cross-tokenizer nudging (NUDGING.md section 7), greedy.

No KV cache and no incremental state: before every decision each model's whole context is rebuilt
from the spans by the rule (own spans as emitted tokens, the other's spans converted word by word)
and run through a full transformers forward.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from nudge_engine.cross.engine import AGREE_LOOKAHEAD
from nudge_engine.cross.spans import decode_spans
from nudge_engine.cross.wordpieces import WHITESPACE, WordPieces, starts_word

from reference import hf_model, next_logits

BASE, NUDGER = 0, 1


@dataclass
class CrossResult:
    text: str
    spans: list[tuple[str, str]]
    token_ids: list[int]          # the base model's tokens of the text
    sources: list[str]
    finish_reason: str


@torch.no_grad()
def cross_nudging(folders, wps: tuple[WordPieces, WordPieces], prompts, gamma: float, resume_on_agreement: bool,
                  max_tokens: int, eos: tuple[frozenset, frozenset], nudger_limit: int) -> CrossResult:
    """nudger_limit: the request ends ("length") once the nudger's context holds this many tokens."""
    models = [hf_model(f) for f in folders]
    spans: list[list] = []        # [writer, bytes, own tokens]

    def context(m: int, extra=()) -> list[int]:
        ids = list(prompts[m])
        for writer, data, own in spans:
            ids += own if writer == m else wps[m].encode(bytes(data))
        return ids + list(extra)

    def base_tokens() -> tuple[list[int], list[int]]:
        ids, src = [], []
        for writer, data, own in spans:
            toks = own if writer == BASE else wps[BASE].encode(bytes(data))
            ids += toks
            src += [writer] * len(toks)
        return ids, src

    def write(writer: int, t: int) -> None:
        if not spans or spans[-1][0] != writer:
            spans.append([writer, bytearray(), []])
        spans[-1][1] += wps[writer].token_bytes[t]
        spans[-1][2].append(t)

    def base_view():
        p = torch.softmax(next_logits(models[BASE], context(BASE)), -1)
        return float(p.max()), int(p.argmax())

    def agrees(a: int, t: int) -> bool:
        """Base token a's text is a prefix of the nudger's next word, which starts with t."""
        ab = wps[BASE].token_bytes[a]
        if not ab or any(c in WHITESPACE for c in ab[1:]):
            return False
        cont, word = [t], wps[NUDGER].token_bytes[t]
        while len(cont) < AGREE_LOOKAHEAD and cont[-1] not in eos[NUDGER] and len(word) < len(ab):
            u = int(next_logits(models[NUDGER], context(NUDGER, cont)).argmax())
            if starts_word(wps[NUDGER].token_bytes[u]):
                break
            cont.append(u)
            word += wps[NUDGER].token_bytes[u]
        return word.startswith(ab)

    mode, run, finish = BASE, 0, None
    while finish is None:
        if mode == BASE:
            top1, a = base_view()
            if top1 < gamma:
                mode, run = NUDGER, 0
                continue
            writer, t = BASE, a
        else:
            t = int(next_logits(models[NUDGER], context(NUDGER)).argmax())
            writer = NUDGER
            if run > 0 and (t in eos[NUDGER] or starts_word(wps[NUDGER].token_bytes[t])):
                top1, a = base_view()   # the base has read the nudger's text up to this word start
                if top1 >= gamma or (resume_on_agreement and agrees(a, t)):
                    mode, writer, t = BASE, BASE, a
            run = run + 1 if writer == NUDGER else 0
        write(writer, t)
        if t in eos[writer]:
            finish = "stop"
        elif len(base_tokens()[0]) >= max_tokens or len(context(NUDGER)) >= nudger_limit:
            finish = "length"
    ids, src = base_tokens()
    data = b"".join(bytes(d) for _, d, _ in spans)
    if len(ids) > max_tokens:      # max_tokens counts the base's tokens: the text ends with the last kept one
        ids, src = ids[:max_tokens], src[:max_tokens]
        data = data[:len(wps[BASE].bytes_of(ids))]
    cut, end = [], 0
    for writer, d, _ in spans:
        if end < len(data):
            cut.append((writer, bytes(d[:len(data) - end])))
        end += len(d)
    return CrossResult(data.decode("utf-8", "replace"), decode_spans(cut), ids,
                       [("base", "nudger")[s] for s in src], finish)
