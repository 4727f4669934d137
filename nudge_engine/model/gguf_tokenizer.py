"""A GGUF file's tokenizer, rebuilt with the `tokenizers` library from the file's metadata.

A GGUF carries no tokenizer.json: it stores the vocabulary, merges (or scores), token types,
special token ids and the chat template under llama.cpp's keys. `tokenizer.ggml.model` says the
kind ("gpt2": byte-level BPE; "llama": sentencepiece BPE with byte fallback) and
`tokenizer.ggml.pre` how llama.cpp splits text before the merges; both are rebuilt as llama.cpp
reads them. An unknown kind or split is an error, not a guess.
"""
from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from .byte_alphabet import bytes_to_unicode
from .errors import ModelFolderError
from .gguf_checkpoint import field, open_gguf

TOKEN_CONTROL, TOKEN_USER_DEFINED = 3, 4      # llama.cpp's token types (1 is normal, 6 a byte)
SPIECE_SPACE = "\u2581"

# llama.cpp's pre-tokenizer regexes (llama-vocab.cpp), by tokenizer.ggml.pre.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# pre -> (regexes applied in order, ignore_merges: a word that is a whole token is not merged)
PRE_SPLITS = {
    "default": ([_GPT2], False),
    "gpt2": ([_GPT2], False),
    "gpt-2": ([_GPT2], False),
    "olmo": ([_GPT2], False),
    "smollm": ([r"\p{N}", _GPT2], False),
    "llama-bpe": ([_LLAMA3], True),
    "llama3": ([_LLAMA3], True),
    "llama-v3": ([_LLAMA3], True),
    "dbrx": ([_LLAMA3], False),
    "qwen2": ([_QWEN2], False),
}


def _byte_level(tokens: list[str], types: list[int], merges: list[str], pre: str | None, path: Path) -> Tokenizer:
    if pre not in PRE_SPLITS and pre is not None:
        raise ModelFolderError(f"{path}: GGUF pre-tokenizer {pre!r} is not supported "
                               f"(supported: {', '.join(sorted(PRE_SPLITS))})")
    splits, ignore_merges = PRE_SPLITS[pre or "default"]
    # A few files spell a plain token in UTF-8 rather than in the byte alphabet: respell it (as transformers does).
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {t if kind == TOKEN_CONTROL or set(t) <= alphabet else "".join(spelling[b] for b in t.encode()): i
             for i, (t, kind) in enumerate(zip(tokens, types))}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(models.BPE(vocab, pairs, ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Sentencepiece BPE stores scores, not merges: a token is made by merging any split of it into two
    tokens, and a better-scored result merges first (as transformers' SentencePieceExtractor)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    found = []
    for token, score in zip(tokens, scores):
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                found.append((-score, vocab[left], vocab[right], left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


def _sentencepiece(tokens: list[str], scores: list[float], merges: list[str] | None, unk: str | None,
                   add_space_prefix: bool, gemma: bool) -> Tokenizer:
    if gemma:
        # Gemma files store a token of several spaces as spaces, and its scores do not follow the merge
        # order while the token order does (as transformers' GGUF gemma_tokenizer reads them).
        tokens = [SPIECE_SPACE * len(t) if len(t) > 1 and not t.strip(" ") else t for t in tokens]
        scores = [-float(i) for i in range(len(tokens))]
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges] if merges else _merges_from_scores(tokens, scores)
    tok = Tokenizer(models.BPE(vocab, pairs, unk_token=unk, fuse_unk=True, byte_fallback=True))
    steps = [normalizers.Prepend(SPIECE_SPACE)] if add_space_prefix else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", SPIECE_SPACE)])
    strip = [decoders.Strip(" ", 1, 0)] if add_space_prefix else []
    tok.decoder = decoders.Sequence([decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(),
                                     decoders.Fuse()] + strip)
    return tok


def load_gguf_tokenizer(path: str | Path) -> tuple[Tokenizer, dict]:
    """(tokenizer, a tokenizer_config.json-style dict: chat_template, bos_token, eos_token)."""
    path = Path(path)
    reader = open_gguf(path)
    kind = field(reader, "tokenizer.ggml.model")
    tokens = field(reader, "tokenizer.ggml.tokens")
    if kind is None or not tokens:
        raise ModelFolderError(f"{path}: no tokenizer in the GGUF metadata (tokenizer.ggml.model / tokens)")
    types = field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = field(reader, "tokenizer.ggml.merges")

    def token_of(key: str) -> str | None:
        tid = field(reader, f"tokenizer.ggml.{key}_token_id")
        return tokens[tid] if tid is not None and 0 <= tid < len(tokens) else None

    if kind == "gpt2":
        if not merges:
            raise ModelFolderError(f"{path}: byte-level GGUF tokenizer without tokenizer.ggml.merges")
        tok = _byte_level(tokens, types, merges, field(reader, "tokenizer.ggml.pre"), path)
        add_bos_default = False
    elif kind == "llama":
        scores = field(reader, "tokenizer.ggml.scores") or [0.0] * len(tokens)
        tok = _sentencepiece(tokens, scores, merges, token_of("unknown"),
                             bool(field(reader, "tokenizer.ggml.add_space_prefix", True)),
                             str(field(reader, "general.architecture", "")).startswith("gemma"))
        add_bos_default = True   # llama.cpp adds BOS to a sentencepiece vocabulary that does not say otherwise
    else:
        raise ModelFolderError(f"{path}: GGUF tokenizer model {kind!r} is not supported (supported: gpt2, llama)")

    # Control tokens stay whole and are special; user-defined ones stay whole (llama.cpp matches both).
    # Only under their own id: one the model spells differently (respelled above) would get a new id.
    own = tok.get_vocab()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for i, (t, kind_) in enumerate(zip(tokens, types))
                            if kind_ == TOKEN_CONTROL and own.get(t) == i])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for i, (t, kind_) in enumerate(zip(tokens, types))
                    if kind_ == TOKEN_USER_DEFINED and own.get(t) == i])
    bos = token_of("bos")
    if bool(field(reader, "tokenizer.ggml.add_bos_token", add_bos_default)) and bos is not None:
        bos_id = int(field(reader, "tokenizer.ggml.bos_token_id"))
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 $B:1", special_tokens=[(bos, bos_id)])
    config = {"chat_template": field(reader, "tokenizer.chat_template"), "bos_token": bos,
              "eos_token": token_of("eos")}
    return tok, config
