"""Logprobs on the text path: one entry per token as its writer wrote it.

The output text is written in two vocabularies, so `logprobs` here are not aligned with
`token_ids` (the base model's tokens of the text): there is one entry per written token, in text
order, for the base's tokens and the nudger's alike, each with its writer's log-probability
(log_softmax of the writer's raw logits at temperature 1, on the writer's own context: what the
token path reports for base- and nudger-written tokens), the written token first, then the
writer's top-n. Entries are keyed by JOINT ids: a base token's id as is, a nudger token's id plus
`nudger_offset` (the base vocabulary's size), so one id names one token of one model;
`logprob_token_ids` lists the written tokens' joint ids and `JointVocab` gives their text (the
token's own bytes), so the strings of the entries join to the text. A token that starts past a
final cut (stop string, max_tokens) has no entry. prompt_logprobs are the base model's, as on the
token path (scoring a text is the base's job): its prefill rows, each prompt token scored once.
"""
from __future__ import annotations

import torch

from .host_read import host_read
from .spans import BASE, NUDGER
from .token import _top_logprobs


def written_entry(row: torch.Tensor, token: int, top_n: int, offset: int) -> dict[int, float]:
    """row [vocab] raw logits of the writer -> {joint id: logprob}, the written token first."""
    lp = torch.log_softmax(host_read(row.float()), dim=-1)
    entry = {token + offset: float(lp[token])}
    if top_n > 0:
        vals, ids = lp.topk(top_n)
        for v, t in zip(vals.tolist(), ids.tolist()):
            entry.setdefault(t + offset, v)
    return entry


class JointVocab:
    """Token text by joint id, with the tokenizer interface the server's logprobs formatting uses."""

    def __init__(self, wps, tokenizers, base_vocab_size: int):
        self.wps, self.tokenizers = wps, tokenizers          # [model]
        self.nudger_offset = max(len(wps[BASE].token_bytes), base_vocab_size)

    def split(self, joint_id: int) -> tuple[int, int]:
        """-> (model, token id in that model's vocabulary)."""
        if joint_id >= self.nudger_offset:
            return NUDGER, joint_id - self.nudger_offset
        return BASE, joint_id

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        out = []
        for jid in ids:
            m, t = self.split(jid)
            data = self.wps[m].token_bytes[t] if t < len(self.wps[m].token_bytes) else b""
            out.append(data.decode("utf-8", "replace") if data else
                       self.tokenizers[m].decode([t], skip_special_tokens=skip_special_tokens))
        return "".join(out)


def _append(req, joint: JointVocab, writer: int, token: int, jid_entry) -> None:
    nbytes = len(joint.wps[writer].token_bytes[token]) if token < len(joint.wps[writer].token_bytes) else 0
    req.written.append((len(req.text.data), nbytes, *jid_entry))


def record_written(req, joint: JointVocab, writer: int, token: int, row: torch.Tensor) -> None:
    """Before `token` joins the text: its entry from the writer's row [vocab], if the request asked."""
    if req.written is not None:
        offset = joint.nudger_offset if writer == NUDGER else 0
        _append(req, joint, writer, token, (token + offset, written_entry(row, token, req.params.logprobs, offset)))


def queue_entry(req, joint: JointVocab, token: int, row: torch.Tensor) -> None:
    """A NUDGE-mode draft's entry, kept with the queue until the token is written or dropped."""
    if req.written is not None:
        offset = joint.nudger_offset
        req.queue_lp.append((token + offset, written_entry(row, token, req.params.logprobs, offset)))


def record_queued(req, joint: JointVocab, q: int, token: int) -> None:
    """Before the queue's token q joins the text as the nudger's."""
    if req.written is not None:
        _append(req, joint, NUDGER, token, req.queue_lp[q])


def prompt_rows(req, computed: int, num: int, start: int) -> list[int]:
    """Rows of the flat base pass (this request's tokens start at `start`) that score prompt tokens
    not scored yet: the row at position p predicts token p + 1 (a recompute scores nothing twice)."""
    if req.prompt_logprobs is None:
        return []
    first = max(computed, len(req.prompt_logprobs) - 1)
    upto = min(computed + num, len(req.prompts[BASE]) - 1)
    return [start + p - computed for p in range(first, upto)]


def record_prompt(req, rows: torch.Tensor) -> None:
    """rows [n, vocab] base logits from prompt_rows -> the next n prompt tokens' entries."""
    done = len(req.prompt_logprobs)
    targets = req.prompts[BASE][done:done + rows.shape[0]]
    lp = host_read(torch.log_softmax(rows.float(), dim=-1))
    req.prompt_logprobs.extend(_top_logprobs(lp, targets, req.params.prompt_logprobs))
