"""Slow obvious references: transformers models, no KV cache, one full forward per token."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch
from tokenizers import Tokenizer as HFTokenizer
from transformers import AutoModelForCausalLM

BASE, NUDGE = "base", "nudger"


WORD_START_CHARS = ("\u0120", "\u010a", "\u0109", "\u2581")      # Ġ Ċ ĉ ▁
WHITESPACE_BYTE_PIECES = ("<0x09>", "<0x0A>", "<0x0D>", "<0x20>")


@lru_cache(maxsize=16)
def word_start_table(folder) -> list[bool]:
    """NUDGING.md section 3, read from the folder's tokenizer.json with `tokenizers` (not the engine's
    code): a special token, a piece that begins with one of the four markers or a whitespace
    character, or the byte-fallback piece of a whitespace byte. Padded to the model's vocab_size."""
    tok = HFTokenizer.from_file(str(Path(folder) / "tokenizer.json"))
    vocab_size = json.loads((Path(folder) / "config.json").read_text())["vocab_size"]
    special = {t["id"] for t in json.loads(tok.to_str())["added_tokens"] if t["special"]}
    table = [False] * max(vocab_size, tok.get_vocab_size())
    for piece, tid in tok.get_vocab(with_added_tokens=True).items():
        table[tid] = (tid in special or piece.startswith(WORD_START_CHARS) or piece in WHITESPACE_BYTE_PIECES
                      or piece[:1].isspace())
    return table


def eos_ids(folder) -> frozenset[int]:
    """The model's end tokens from generation_config.json, else config.json (an id or a list)."""
    for name in ("generation_config.json", "config.json"):
        path = Path(folder) / name
        if path.is_file() and (eos := json.loads(path.read_text()).get("eos_token_id")) is not None:
            return frozenset(eos if isinstance(eos, list) else [eos])
    return frozenset()


def processed(logits: torch.Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """logits [..., vocab] -> the sampling distribution: temperature, then top-k, then top-p of the
    renormalized rest (a token stays while the mass strictly above it is below top_p)."""
    probs = torch.softmax(logits.double() / temperature, -1)
    ordered, order = probs.sort(-1, descending=True)
    rank = torch.arange(probs.shape[-1])
    keep = rank < top_k if top_k > 0 else torch.ones_like(rank, dtype=torch.bool)
    ordered = torch.where(keep, ordered, 0.0)
    ordered = ordered / ordered.sum(-1, keepdim=True)
    keep = keep & (ordered.cumsum(-1) - ordered < top_p)
    ordered = torch.where(keep, ordered, 0.0)
    return torch.zeros_like(probs).scatter(-1, order, ordered / ordered.sum(-1, keepdim=True))


@lru_cache(maxsize=16)
def hf_model(folder) -> torch.nn.Module:
    """A model folder, or a .gguf file (read by transformers' own GGUF loader)."""
    folder = Path(folder)
    if folder.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(str(folder.parent), gguf_file=folder.name, dtype=torch.float32,
                                                     attn_implementation="eager")
    else:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="eager")
    return model.eval()


@torch.no_grad()
def next_logits(model, ids: list[int]) -> torch.Tensor:  # [vocab] float32
    return model(torch.tensor([ids])).logits[0, -1].float()


@torch.no_grad()
def hf_greedy(folder, prompt: list[int], max_tokens: int, eos_ids=()) -> list[int]:
    """Greedy decoding by full forwards; stops after an eos token (kept), like generate()."""
    model, out = hf_model(folder), []
    while len(out) < max_tokens:
        t = int(next_logits(model, prompt + out).argmax())
        out.append(t)
        if t in eos_ids:
            break
    return out


@torch.no_grad()
def sequential_nudging(base_folder, nudger_folder, base_prompt: list[int], nudger_prompt: list[int],
                       gamma: float, resume_on_agreement: bool, word_start: list[bool], max_tokens: int,
                       eos_ids=()) -> tuple[list[int], list[str]]:
    """NUDGING.md section 2, greedy, literally."""
    base, nudger = hf_model(base_folder), hf_model(nudger_folder)
    y, sources, mode, run = [], [], BASE, 0
    while len(y) < max_tokens:
        p_b = torch.softmax(next_logits(base, base_prompt + y), -1)
        top1, a_b = float(p_b.max()), int(p_b.argmax())
        if mode == BASE:
            if top1 < gamma:
                mode, run = NUDGE, 0
                continue
            t, src = a_b, BASE
        else:
            t = int(next_logits(nudger, nudger_prompt + y).argmax())
            resume = top1 >= gamma or (resume_on_agreement and a_b == t)
            if run > 0 and word_start[t] and resume:
                mode, t, src = BASE, a_b, BASE
            else:
                src, run = NUDGE, run + 1
        y.append(t)
        sources.append(src)
        if t in eos_ids:
            break
    return y, sources
