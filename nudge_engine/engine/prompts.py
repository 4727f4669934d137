"""Turns the prompt forms users send into each model's token ids (NUDGING.md section 6)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

from ..model.tokenizer import Tokenizer

DEFAULT_BASE_TEMPLATE = "{system}\n{user}\n"

Prompt = Union[str, list[int], dict[str, Any]]


@dataclass(frozen=True)
class ChatFormat:
    base_template: str = DEFAULT_BASE_TEMPLATE   # the base model's plain rendering of a chat
    response_prefix: str = ""                    # e.g. "Answer:" (the paper's base template)
    # Without a nudger, a chat goes through the base model's own chat template when it has one (as
    # vLLM serves an instruct model); False (an explicit base template) forces the plain rendering.
    base_chat_template: bool = True


def check_text(value: str, what: str) -> str:
    """ValueError for text no tokenizer can read: lone surrogates (from JSON escapes or undecodable argv)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid Unicode text: a lone surrogate (U+{ord(value[e.start]):04X}) at "
                         f"character {e.start}") from None
    return value


def _ids_or_text(value: Any, tokenizer: Tokenizer, what: str) -> list[int]:
    if isinstance(value, str):
        return tokenizer.encode(check_text(value, what))
    if isinstance(value, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        bad = [t for t in value if not 0 <= t < tokenizer.vocab_size]
        if bad:
            raise ValueError(f"{what}: token ids {bad[:5]} outside the vocabulary [0, {tokenizer.vocab_size})")
        return list(value)
    raise ValueError(f"{what}: expected a text or a list of token ids, got {type(value).__name__}")


def render_base_chat(messages: list[dict], fmt: ChatFormat) -> str:
    system = "\n".join(m["content"] for m in messages if m.get("role") == "system")
    user = "\n".join(m["content"] for m in messages if m.get("role") != "system")
    return fmt.base_template.format(system=system, user=user).lstrip("\n") + fmt.response_prefix


def _check_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}] must be an object with string 'role' and 'content'")
        check_text(m["role"], f"messages[{i}].role")
        check_text(m["content"], f"messages[{i}].content")
    return messages


def tokenize_prompt(prompt: Prompt, base_tok: Tokenizer, nudger_tok: Tokenizer | None,
                    fmt: ChatFormat) -> tuple[list[int], list[int] | None]:
    """(base prompt ids, nudger prompt ids or None without a nudger).

    A chat prompt may carry "chat_template" (a request's own template, for the nudger, or for the
    base model when it serves alone), "base_template" and "response_prefix"."""
    if isinstance(prompt, dict) and "messages" in prompt:
        messages = _check_messages(prompt["messages"])
        template = prompt.get("chat_template")
        fmt = ChatFormat(check_text(prompt.get("base_template", fmt.base_template), "base_template"),
                         check_text(prompt.get("response_prefix", fmt.response_prefix), "response_prefix"),
                         fmt.base_chat_template and "base_template" not in prompt)
        if nudger_tok is None and fmt.base_chat_template and (template or base_tok.chat_template):
            # The rendered template carries its own special tokens (bos and markers).
            text = base_tok.render_chat(messages, template=template) + fmt.response_prefix
            return base_tok.encode(text, add_special_tokens=False), None
        base = base_tok.encode(render_base_chat(messages, fmt))
        if nudger_tok is None:
            return base, None
        return base, nudger_tok.encode(nudger_tok.render_chat(messages, template=template), add_special_tokens=False)
    if isinstance(prompt, dict):
        unknown = set(prompt) - {"base", "nudger"}
        if unknown or "base" not in prompt:
            raise ValueError("a prompt dict is {'base': ..., 'nudger': ...} or {'messages': [...]}")
        base = _ids_or_text(prompt["base"], base_tok, "prompt['base']")
        if nudger_tok is None:
            return base, None
        return base, _ids_or_text(prompt.get("nudger", prompt["base"]), nudger_tok, "prompt['nudger']")
    base = _ids_or_text(prompt, base_tok, "prompt")
    if nudger_tok is None:
        return base, None
    return base, _ids_or_text(prompt, nudger_tok, "prompt")
