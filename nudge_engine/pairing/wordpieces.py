"""Text <-> one model's tokens for the cross-tokenizer path (NUDGING.md section 7).

The shared output is kept as BYTES, not str: tiny and real models alike emit single bytes of a
multi-byte character (byte-level pieces, `<0xNN>` byte fallback), and a span can end inside a
character. Every conversion here is byte-exact: the bytes of `encode(data)` are `data`.

Word by word: `data` is split before each whitespace byte and each piece is encoded alone, with no
special tokens and no added prefix space. ASCII whitespace only, on purpose: it is one byte, so
"the next character is whitespace" is decided by the first byte of the next token, whereas a
multi-byte Unicode space can be split across tokens.
"""
from __future__ import annotations

import json
import re

from tokenizers import Tokenizer as HFTokenizer

from ..model.byte_alphabet import bytes_to_unicode
from ..model.tokenizer import Tokenizer

WHITESPACE = frozenset(b" \t\n\r\x0b\x0c")
SPACE_PIECE = "▁"                                   # U+2581: Metaspace / SentencePiece space
BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")  # byte fallback piece
ESCAPED_BYTES = re.compile(r"[\udc80-\udcff]+")     # invalid UTF-8 bytes under "surrogateescape"
ESCAPE_BASE = 0xDC00
REPLACEMENT_CHAR = "\ufffd"                       # what a byte the vocabulary cannot spell reads as


def split_pieces(data: bytes) -> list[bytes]:
    """Split before each whitespace byte: b"a  b\\n" -> [b"a", b" ", b" b", b"\\n"]."""
    pieces, start = [], 0
    for i in range(1, len(data)):
        if data[i] in WHITESPACE:
            pieces.append(data[start:i])
            start = i
    if data:
        pieces.append(data[start:])
    return pieces


def starts_word(data: bytes) -> bool:
    return bool(data) and data[0] in WHITESPACE


def _strip_prefix_space(node):
    """The tokenizer JSON with every "add a leading space" step turned off (recursively)."""
    if isinstance(node, dict):
        if node.get("type") == "Prepend":
            return None
        node = {k: _strip_prefix_space(v) for k, v in node.items()}
        if node.get("type") in ("Metaspace", "ByteLevel"):
            if "add_prefix_space" in node:
                node["add_prefix_space"] = False
            if "prepend_scheme" in node:
                node["prepend_scheme"] = "never"
        for key in ("normalizers", "pretokenizers"):
            if isinstance(node.get(key), list):
                node[key] = [n for n in node[key] if n is not None]
        return node
    if isinstance(node, list):
        return [_strip_prefix_space(n) for n in node]
    return node


class WordPieces:
    """One tokenizer's byte view: token -> bytes, and bytes -> tokens word by word."""

    def __init__(self, tok: Tokenizer):
        spec = json.loads(tok.hf.to_str())
        self.byte_level = "ByteLevel" in json.dumps(spec.get("decoder"))
        # Encoder for pieces: same model, no prefix space, no post-processor, and no added tokens,
        # so text that happens to read "<s>" is encoded as text, never as a special token.
        piece_spec = _strip_prefix_space({**spec, "post_processor": None, "added_tokens": []})
        self._piece_tok = HFTokenizer.from_str(json.dumps(piece_spec))
        self.special = frozenset(tok.special_ids)
        self.token_bytes = self._token_bytes_table(tok)              # [vocab] bytes
        self.byte_token = self._byte_tokens(tok)                     # [256] token ids (one, as a rule)
        # Longest token that can be a word's prefix (no whitespace after its first byte): the
        # agreement test never needs more of the other model's word than this.
        self.max_word_token_bytes = max(
            (len(b) for b in self.token_bytes if not any(c in WHITESPACE for c in b[1:])), default=1)

    def _token_bytes_table(self, tok: Tokenizer) -> list[bytes]:
        table = [b""] * tok.vocab_size
        decode_char = {c: b for b, c in bytes_to_unicode().items()} if self.byte_level else None
        for piece, tid in tok.vocab.items():
            if tid in self.special:
                continue                              # special tokens are not text
            if decode_char is not None:
                table[tid] = bytes(decode_char[c] for c in piece)
            elif (m := BYTE_PIECE.match(piece)) is not None:
                table[tid] = bytes([int(m.group(1), 16)])
            else:
                table[tid] = piece.replace(SPACE_PIECE, " ").encode("utf-8")
        return table

    def _byte_tokens(self, tok: Tokenizer) -> list[int]:
        if self.byte_level:
            # Real byte-level vocabularies may lack bytes that never occur in UTF-8 (0xC0, 0xC1, 0xF5-0xFF,
            # SmolLM2's for one); such a byte, written by the other model, reads as U+FFFD here.
            replacement = self._piece_tok.encode(REPLACEMENT_CHAR, add_special_tokens=False).ids
            return [[tok.vocab[c]] if c in tok.vocab else replacement for _, c in sorted(bytes_to_unicode().items())]
        missing = [b for b in range(256) if f"<0x{b:02X}>" not in tok.vocab]
        if missing:
            raise ValueError("the cross-tokenizer path needs a byte-level or byte-fallback tokenizer "
                             f"(no piece for byte 0x{missing[0]:02X})")
        return [[tok.vocab[f"<0x{b:02X}>"]] for b in range(256)]

    def bytes_of(self, ids) -> bytes:
        return b"".join(self.token_bytes[t] for t in ids)

    def encode_piece(self, piece: bytes) -> list[int]:
        """One piece alone. Valid UTF-8 runs go through the tokenizer; invalid bytes (a character
        cut by a span boundary) become byte tokens, which no str-based encoder can produce."""
        text = piece.decode("utf-8", "surrogateescape")
        ids, pos = [], 0
        for m in ESCAPED_BYTES.finditer(text):
            if m.start() > pos:
                ids += self._piece_tok.encode(text[pos:m.start()], add_special_tokens=False).ids
            ids += [t for c in m.group() for t in self.byte_token[ord(c) - ESCAPE_BASE]]
            pos = m.end()
        if pos < len(text):
            ids += self._piece_tok.encode(text[pos:], add_special_tokens=False).ids
        return ids

    def encode(self, data: bytes) -> list[int]:
        """Word by word: `data` must start at a piece boundary (a span start or a whitespace byte)."""
        return [t for p in split_pieces(data) for t in self.encode_piece(p)]
