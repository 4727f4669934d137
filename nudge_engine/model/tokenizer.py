"""A model folder's (or .gguf file's) tokenizer: encode, incremental decode, word-start table, sandboxed chat template
(rendered in a renderer process on a budget, and tried once at load: chat_sandbox.py)."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

from tokenizers import Tokenizer as HFTokenizer

from . import chat_sandbox
from .errors import ModelFolderError

log = logging.getLogger("nudge_engine")

WORD_START_PREFIXES = ("Ġ", "Ċ", "ĉ", "▁")  # U+0120, U+010A, U+0109, U+2581 (NUDGING.md section 3)
WHITESPACE_BYTE_PIECES = {"<0x09>", "<0x0A>", "<0x0D>", "<0x20>"}
INCOMPLETE_CHAR = "\ufffd"    # what a decoder yields for a multi-byte character cut between tokens
DETOKENIZE_CONTEXT = 5        # tokens of left context re-decoded so spaces and merges come out right
# Longer texts are encoded without holding the GIL (a megabyte takes about a second): a server thread
# tokenizing one does not stall the event loop. Shorter ones take the cheaper call.
GIL_FREE_ENCODE_CHARS = 4096


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
        self.path = folder
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
        # Why this model's own template can never serve a chat (it does not compile, or a one-message
        # chat breaks its budget), found once here; its chat requests are then refused at once.
        self.chat_template_error: str | None = None
        if self.chat_template:
            self.chat_template_error = chat_sandbox.check(self.chat_template, self._template_context(
                chat_sandbox.TRIAL_MESSAGES, True), self.template_name)
            if self.chat_template_error:
                log.info("%s", self.chat_template_error)   # the server repeats it as a warning at start-up

    @property
    def template_name(self) -> str:
        """What errors call this model's chat template."""
        return f"the chat template of {self.path}"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if len(text) > GIL_FREE_ENCODE_CHARS:
            # encode holds the GIL throughout; encode_batch_fast releases it and computes no offsets, which
            # would also cost a second of GIL-held conversion and deallocation for a megabyte (same ids).
            return self.hf.encode_batch_fast([text], add_special_tokens=add_special_tokens)[0].ids
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

    def _template_context(self, messages: list[dict], add_generation_prompt: bool) -> dict:
        return {"messages": messages, "add_generation_prompt": add_generation_prompt,
                "bos_token": self.bos_token or "", "eos_token": self.eos_token or ""}

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    template: str | None = None) -> str:
        """`template`: a request's own, else this model's. Raises ValueError (chat_sandbox.TemplateError)."""
        if template:
            name = "the request's chat_template"
        elif not self.chat_template:
            raise ValueError("this model's tokenizer_config.json has no chat_template; send a completion prompt")
        elif self.chat_template_error:
            raise chat_sandbox.TemplateError(self.chat_template_error)
        else:
            template, name = self.chat_template, self.template_name
        return _valid_text(chat_sandbox.render(template, self._template_context(messages, add_generation_prompt), name),
                           name)


def _valid_text(text: str, name: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise chat_sandbox.TemplateError(f"{name} rendered text that is not valid Unicode (a lone surrogate, "
                                         f"U+{ord(text[e.start]):04X})") from None
    return text


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool, **extra: Any) -> str:
    """Renders in jinja2's immutable sandbox (a template can read its inputs, never run code), in a renderer
    process on a budget of time, output and memory (chat_sandbox.py)."""
    context = {"messages": messages, "add_generation_prompt": add_generation_prompt, **extra}
    return _valid_text(chat_sandbox.render(template, context, "the chat template"), "the chat template")


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
