"""Slow obvious reference for cross-tokenizer nudging (NUDGING.md section 7), greedy or sampled.

No KV cache and no incremental state: before every decision each model's whole context is rebuilt
from the spans by the rule (own spans as emitted tokens, the other's spans converted word by word)
and run through a full transformers forward (memoized per context when a cache is given: the
same context always gives the same logits).

Sampling (section 7's last paragraph, with section 5's per-model settings): each model samples its
own tokens from its own processed distribution, one token at a time, in the order the sequential
process writes them; the handoff tests read the base's raw distribution; at a takeover the base
samples a fresh token. The nudger's next word, read by the agreement test, is what it samples next:
if the base does not take over, those tokens are the nudger's next tokens.
"""
from __future__ import annotations

import codecs
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer as HFTokenizer

from reference import hf_model, next_logits, processed

BASE, NUDGER = 0, 1
NAMES = ("base", "nudger")
# NUDGING.md section 7, in its own words (nothing here is imported from the engine):
WHITESPACE = b" \t\n\r\x0b\x0c"   # "ASCII whitespace"
AGREE_LOOKAHEAD = 8                  # "read over at most 8 nudger tokens"
SPACE_PIECE = "\u2581"


def starts_word(data: bytes) -> bool:
    """A nudger token starts a word iff its bytes begin with ASCII whitespace."""
    return data[:1] != b"" and data[0] in WHITESPACE


def gpt2_byte_chars() -> dict[int, str]:
    """The byte-level BPE alphabet: printable bytes stand for themselves, the rest map to 256+."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


def _no_prefix_space(node):
    """The tokenizer spec with every step that adds a leading space removed."""
    if isinstance(node, list):
        return [n for n in (_no_prefix_space(x) for x in node) if n is not None]
    if not isinstance(node, dict):
        return node
    if node.get("type") == "Prepend":
        return None
    node = {k: _no_prefix_space(v) for k, v in node.items()}
    if "add_prefix_space" in node:
        node["add_prefix_space"] = False
    if "prepend_scheme" in node:
        node["prepend_scheme"] = "never"
    return node


class TokenizerBytes:
    """One model's tokenizer read from its folder with `tokenizers`: token -> bytes, and text ->
    tokens word by word (split before each whitespace byte, each piece alone, no special tokens,
    no added prefix space). Bytes that are not valid UTF-8 (a character cut by a span boundary)
    become the tokenizer's own byte tokens."""

    def __init__(self, folder):
        spec = json.loads((Path(folder) / "tokenizer.json").read_text())
        byte_level = "ByteLevel" in json.dumps(spec.get("decoder"))
        special = {t["id"] for t in spec["added_tokens"] if t["special"]}
        vocab = dict(spec["model"]["vocab"])
        size = max(vocab.values()) + 1
        chars = gpt2_byte_chars()
        unchar = {c: b for b, c in chars.items()}
        self.token_bytes = [b""] * size
        for piece, tid in vocab.items():
            if tid in special:
                continue
            if byte_level:
                self.token_bytes[tid] = bytes(unchar[c] for c in piece)
            elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                self.token_bytes[tid] = bytes([int(piece[3:5], 16)])
            else:
                self.token_bytes[tid] = piece.replace(SPACE_PIECE, " ").encode()
        self.byte_token = [vocab[chars[b]] if byte_level else vocab[f"<0x{b:02X}>"] for b in range(256)]
        plain = {**_no_prefix_space(spec), "added_tokens": [], "post_processor": None}
        self.tok = HFTokenizer.from_str(json.dumps(plain))
        self.memo: dict[bytes, list[int]] = {}    # the conversion is a function of the bytes

    def bytes_of(self, ids) -> bytes:
        return b"".join(self.token_bytes[t] for t in ids)

    def _encode_piece(self, piece: bytes) -> list[int]:
        ids, run = [], ""
        for ch in piece.decode("utf-8", "surrogateescape"):      # invalid bytes -> U+DC80..U+DCFF
            if "\udc80" <= ch <= "\udcff":
                ids += self.tok.encode(run, add_special_tokens=False).ids if run else []
                ids.append(self.byte_token[ord(ch) - 0xDC00])
                run = ""
            else:
                run += ch
        return ids + (self.tok.encode(run, add_special_tokens=False).ids if run else [])

    def encode(self, data: bytes) -> list[int]:
        if data not in self.memo:
            self.memo[data] = self._encode(data)
        return list(self.memo[data])

    def _encode(self, data: bytes) -> list[int]:
        cuts = [0] + [i for i in range(1, len(data)) if data[i] in WHITESPACE] + [len(data)]
        return [t for a, b in zip(cuts, cuts[1:]) if b > a for t in self._encode_piece(data[a:b])]


def decode_spans(spans: list[tuple[int, bytes]]) -> list[tuple[str, str]]:
    """Span texts that join to the text: a character cut by a boundary goes to the span that completes it."""
    dec = codecs.getincrementaldecoder("utf-8")("replace")
    out = [[dec.decode(data), NAMES[w]] for w, data in spans]
    out[-1][0] += dec.decode(b"", final=True)
    return [tuple(x) for x in out]


@dataclass
class CrossResult:
    text: str
    spans: list[tuple[str, str]]
    token_ids: list[int]          # the base model's tokens of the text
    sources: list[str]
    finish_reason: str


@dataclass
class Sampling:
    """Per-model settings (temperature 0 = greedy) and the random numbers of one sample."""
    base: tuple[float, float, int]           # temperature, top_p, top_k
    nudger: tuple[float, float, int]
    generator: torch.Generator
    cache: dict                              # (model, context) -> logits, shared across samples

    def pick(self, m: int, logits: torch.Tensor) -> int:
        temperature, top_p, top_k = (self.base, self.nudger)[m]
        if temperature == 0:
            return int(logits.argmax())
        return int(torch.multinomial(processed(logits, temperature, top_p, top_k), 1, generator=self.generator))


@torch.no_grad()
def cross_nudging(folders, wps: tuple[TokenizerBytes, TokenizerBytes], prompts, gamma: float, resume_on_agreement: bool,
                  max_tokens: int, eos: tuple[frozenset, frozenset], nudger_limit: int,
                  sampling: Sampling | None = None) -> CrossResult:
    """nudger_limit: the request ends ("length") once the nudger's context holds this many tokens.
    sampling: None = both greedy."""
    models = [hf_model(f) for f in folders]
    spans: list[list] = []        # [writer, bytes, own tokens]
    pending: list[int] = []       # the nudger's next tokens, sampled by an agreement test's lookahead
    cache = sampling.cache if sampling is not None else {}

    def logits(m: int, ids: list[int]) -> torch.Tensor:
        key = (m, tuple(ids))
        if key not in cache:
            cache[key] = next_logits(models[m], ids)
        return cache[key]

    def pick(m: int, lg: torch.Tensor) -> int:
        return int(lg.argmax()) if sampling is None else sampling.pick(m, lg)

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
        lg = logits(BASE, context(BASE))
        p = torch.softmax(lg, -1)
        return float(p.max()), int(p.argmax()), lg

    def agrees(a: int, t: int) -> bool:
        """Base token a's text is a prefix of the nudger's next word, which starts with t."""
        ab = wps[BASE].token_bytes[a]
        if not ab or any(c in WHITESPACE for c in ab[1:]):
            return False
        cont, word = [t], wps[NUDGER].token_bytes[t]
        while len(cont) < AGREE_LOOKAHEAD and cont[-1] not in eos[NUDGER] and len(word) < len(ab):
            u = pending[len(cont) - 1] if len(cont) - 1 < len(pending) else pick(NUDGER, logits(NUDGER, context(NUDGER, cont)))
            if len(cont) - 1 == len(pending):
                pending.append(u)           # the nudger's next token, should it keep writing
            if starts_word(wps[NUDGER].token_bytes[u]):
                break
            cont.append(u)
            word += wps[NUDGER].token_bytes[u]
        return word.startswith(ab)

    mode, run, finish = BASE, 0, None
    while finish is None:
        if mode == BASE:
            top1, a, lg = base_view()
            if top1 < gamma:
                mode, run = NUDGER, 0
                continue
            writer, t = BASE, pick(BASE, lg)
        else:
            t = pending.pop(0) if pending else pick(NUDGER, logits(NUDGER, context(NUDGER)))
            writer = NUDGER
            if run > 0 and (t in eos[NUDGER] or starts_word(wps[NUDGER].token_bytes[t])):
                top1, a, lg = base_view()   # the base has read the nudger's text up to this word start
                if top1 >= gamma or (resume_on_agreement and agrees(a, t)):
                    mode, writer, t = BASE, BASE, pick(BASE, lg)   # a fresh token from the base
                    pending.clear()
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
