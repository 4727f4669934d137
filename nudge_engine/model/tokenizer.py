"""A model folder's (or .gguf file's) tokenizer: encode, incremental decode, word-start table, sandboxed chat template."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from .errors import ModelFolderError

WORD_START_PREFIXES = ("Ġ", "Ċ", "ĉ", "▁")  # U+0120, U+010A, U+0109, U+2581 (NUDGING.md section 3)
WHITESPACE_BYTE_PIECES = {"<0x09>", "<0x0A>", "<0x0D>", "<0x20>"}
INCOMPLETE_CHAR = "\ufffd"    # what a decoder yields for a multi-byte character cut between tokens
DETOKENIZE_CONTEXT = 5        # tokens of left context re-decoded so spaces and merges come out right


def _token_text(token: Any) -> str | None:
    if isinstance(token, str):
        return token
    if isinstance(token, dict):
        return token.get("content")
    return None


def _load_folder_tokenizer(folder: Path) -> tuple[HFTokenizer, dict]:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ModelFolderError(f"{folder}: no tokenizer.json (only fast tokenizers are supported)")
    try:
        hf = HFTokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises a bare Exception on bad JSON
        raise ModelFolderError(f"{path}: cannot be read as a tokenizer ({e})") from None
    config_path = folder / "tokenizer_config.json"
    return hf, (json.loads(config_path.read_text()) if config_path.is_file() else {})


class Tokenizer:
    def __init__(self, folder: str | Path):
        folder = Path(folder)
        if folder.suffix.lower() == ".gguf":
            from .gguf_tokenizer import load_gguf_tokenizer  # imports gguf: only for .gguf paths
            self.hf, self.config = load_gguf_tokenizer(folder)
        else:
            self.hf, self.config = _load_folder_tokenizer(folder)
        self.chat_template: str | None = self.config.get("chat_template")
        self.vocab: dict[str, int] = self.hf.get_vocab(with_added_tokens=True)
        self.vocab_size = max(self.vocab.values()) + 1
        self.special_ids = {t.content and self.vocab.get(t.content) for t in self.hf.get_added_tokens_decoder().values()
                            if t.special} - {None}
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def word_start_table(self) -> list[bool]:
        """word_start[t] per NUDGING.md section 3, indexed by token id."""
        table = [False] * self.vocab_size
        for piece, tid in self.vocab.items():
            table[tid] = (
                tid in self.special_ids
                or piece.startswith(WORD_START_PREFIXES)
                or piece in WHITESPACE_BYTE_PIECES
                or (len(piece) > 0 and piece[0].isspace())
            )
        return table

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    template: str | None = None) -> str:
        template = template or self.chat_template
        if not template:
            raise ValueError("this model's tokenizer_config.json has no chat_template; send a completion prompt")
        return render_chat_template(template, messages, add_generation_prompt,
                                    bos_token=self.bos_token or "", eos_token=self.eos_token or "")


def _raise_exception(message: str) -> None:
    raise ValueError(f"chat template: {message}")


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool, **extra: Any) -> str:
    """Renders in jinja2's immutable sandbox: a template from a model folder can read its inputs, never run code."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **extra)
    except jinja2.TemplateError as e:
        raise ValueError(f"chat template failed to render: {e}") from None


class IncrementalDetokenizer:
    """Text of a growing token list, emitted in pieces (vLLM's offsets method).

    Re-decodes a few tokens of left context so byte-level merges and `▁` spaces come out as in a
    full decode, and holds back text while a multi-byte character is still incomplete.

    `add` decodes at once (and returns the new text); `push` and `close` only queue, and the queue is
    decoded, token by token exactly as `add` would, when `text` is next read: the engine's round then
    never pays for text nobody has asked for yet (vLLM detokenizes in its output processor too).
    """

    def __init__(self, tokenizer: Tokenizer, ids: list[int] | None = None, prefix_offset: int = 0,
                 read_offset: int = 0, text: str = ""):
        self.tokenizer = tokenizer
        self.ids: list[int] = ids if ids is not None else []   # context (prompt tail) + output tokens
        self.prefix_offset = prefix_offset
        self.read_offset = read_offset
        self._text = text
        self._queued: list[int] = []     # pushed, not decoded yet
        self._close_queued = False       # flush once the queue is decoded

    @classmethod
    def after_prompt(cls, tokenizer: Tokenizer, prompt_ids: Sequence[int]) -> "IncrementalDetokenizer":
        tail = list(prompt_ids[-DETOKENIZE_CONTEXT:])
        return cls(tokenizer, tail, 0, len(tail))

    @property
    def text(self) -> str:
        self._catch_up()
        return self._text

    @text.setter
    def text(self, value: str) -> None:
        self._catch_up()
        self._text = value

    def push(self, token_ids: Sequence[int]) -> None:
        """Queues tokens; they are decoded when `text` is next read (or by the next add / flush)."""
        self._queued.extend(token_ids)

    def close(self) -> None:
        """Queues the end-of-request flush (see flush) after the queued tokens."""
        self._close_queued = True

    def add(self, token_id: int) -> str:
        """Appends one token; returns the newly complete text (possibly empty)."""
        self._catch_up()
        return self._add(token_id)

    def flush(self) -> str:
        """At the end of a request: whatever is still held back (an incomplete character)."""
        self._catch_up()
        return self._flush()

    def _catch_up(self) -> None:
        if self._queued:
            queued, self._queued = self._queued, []
            for t in queued:
                self._add(t)
        if self._close_queued:
            self._close_queued = False
            self._flush()

    def _add(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset:self.read_offset])
        full = decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith(INCOMPLETE_CHAR):
            new = full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            self._text += new
            return new
        return ""

    def _flush(self) -> str:
        rest = self.tokenizer.decode(self.ids[self.prefix_offset:])[len(self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])):]
        self.prefix_offset = self.read_offset = len(self.ids)
        self._text += rest
        return rest
