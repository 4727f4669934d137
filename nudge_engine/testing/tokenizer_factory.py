"""Tiny tokenizers trained on the shipped corpus, written as Hugging Face `tokenizer.json` folders.

Two styles cover the tokenizers the engine meets in the wild:
  "bytelevel"  GPT-2 / OLMo / Llama-3 / Qwen2: byte-level BPE, `Ġ` marks a leading space.
  "metaspace"  Llama-2 / Gemma: `▁` marks a space, BPE with byte fallback to `<0x00>`..`<0xFF>`.

Training is deterministic: with one `tokenizers` version, the same arguments give the same bytes
on every run.
"""
from __future__ import annotations

import collections
import functools
import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

STYLES = ("bytelevel", "metaspace")
BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
CHAT_MARKERS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
SPACE_PIECE = "▁"
BYTE_PIECES = tuple(f"<0x{b:02X}>" for b in range(256))

CORPUS_PATH = Path(__file__).with_name("corpus.txt")

# Llama-3's word split with Qwen2's single digits. transformers 5 rebuilds any Qwen2 folder's
# tokenizer with exactly this pattern (plus NFC), so matching it keeps the two in agreement.
BYTELEVEL_SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# HF-style: the role tag opens a turn, <|end|> closes it; a trailing <|assistant|> asks for a reply.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{- raise_exception('Unknown role: ' + message['role']) }}"
    "{%- endif %}"
    "{{- '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\n' }}{%- endif %}"
)


def special_tokens(style: str) -> list[str]:
    """Special tokens in id order: they take ids 0..n-1 of the vocabulary."""
    _check_style(style)
    leading = [UNK, BOS, EOS, PAD] if style == "metaspace" else [BOS, EOS, PAD]
    return leading + list(CHAT_MARKERS)


def make_tokenizer(out_dir: str | Path, style: str, vocab_size: int = 512, *, model_max_length: int = 512) -> None:
    """Write `tokenizer.json` and `tokenizer_config.json` for a tokenizer of `style` into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(_trained_tokenizer_json(style, vocab_size), encoding="utf-8")
    config = _tokenizer_config(style, model_max_length)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def corpus_lines() -> list[str]:
    """Non-empty lines of the training corpus; a line is one training sequence."""
    return [line for line in CORPUS_PATH.read_text(encoding="utf-8").splitlines() if line.strip()]


@functools.lru_cache(maxsize=None)
def _trained_tokenizer_json(style: str, vocab_size: int) -> str:
    # Cached: tests and model pairs ask for the same tokenizer many times per process.
    _check_style(style)
    tokenizer = _train_bytelevel(vocab_size) if style == "bytelevel" else _train_metaspace(vocab_size)
    if tokenizer.get_vocab_size() != vocab_size:
        # Too small: the corpus alphabet does not fit. Too large: the corpus runs out of merges.
        raise ValueError(
            f"a {style} tokenizer of {vocab_size} tokens cannot be trained on the shipped corpus "
            f"(got {tokenizer.get_vocab_size()}); a model can still pad its vocabulary with vocab_size"
        )
    # tokenizer_config.json and the model configs take the special ids from special_tokens() order.
    assert [tokenizer.token_to_id(t) for t in special_tokens(style)] == list(range(len(special_tokens(style))))
    return tokenizer.to_str(pretty=True) + "\n"


def _train_bytelevel(vocab_size: int) -> Tokenizer:
    specials = special_tokens("bytelevel")
    if vocab_size < len(specials) + 256 + 1:
        raise ValueError(f"bytelevel vocab_size must exceed {len(specials) + 256} (specials + byte alphabet)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(BYTELEVEL_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[_added(t) for t in specials],
        # Every byte is in the alphabet, so any text encodes without an unknown token.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus_lines(), trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])
    return tokenizer


def _train_metaspace(vocab_size: int) -> Tokenizer:
    specials = special_tokens("metaspace")
    trained_size = vocab_size - len(BYTE_PIECES)  # the byte pieces are added after training
    if trained_size < len(specials) + 2:
        raise ValueError(f"metaspace vocab_size must exceed {len(specials) + 256 + 1} (specials + byte pieces)")

    draft = _metaspace_tokenizer(models.BPE(unk_token=UNK, byte_fallback=True))
    trainer = trainers.BpeTrainer(
        vocab_size=trained_size,
        special_tokens=[_added(t) for t in specials],
        limit_alphabet=_alphabet_limit(),
        show_progress=False,
    )
    draft.train_from_iterator(corpus_lines(), trainer)

    trained = json.loads(draft.to_str())["model"]
    vocab = _insert_byte_pieces(trained["vocab"], len(specials))
    merges = [tuple(pair) for pair in trained["merges"]]
    model = models.BPE(vocab=vocab, merges=merges, unk_token=UNK, fuse_unk=True, byte_fallback=True)
    tokenizer = _metaspace_tokenizer(model)
    tokenizer.add_special_tokens([_added(t) for t in specials])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, vocab[BOS])]
    )
    return tokenizer


def _metaspace_tokenizer(model: models.BPE) -> Tokenizer:
    tokenizer = Tokenizer(model)
    # Llama-2's normalizer: every text gets one leading `▁`, which the decoder's Strip removes again.
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE_PIECE), normalizers.Replace(" ", SPACE_PIECE)])
    # Pieces never cross a word start, as in SentencePiece; "merged_with_next" keeps `▁` on the word it opens.
    tokenizer.pre_tokenizer = pre_tokenizers.Split(SPACE_PIECE, behavior="merged_with_next")
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace(SPACE_PIECE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return tokenizer


def _alphabet_limit() -> int:
    """Keep only characters seen at least twice; the rest (mostly CJK) fall back to byte pieces.

    The trainer drops the rarest characters with an unstable sort, so a cut inside a tie would be
    random; cutting exactly at count 1 drops every character of that count and nothing else.
    """
    counts = collections.Counter("".join(SPACE_PIECE + line.replace(" ", SPACE_PIECE) for line in corpus_lines()))
    return sum(1 for count in counts.values() if count >= 2)


def _insert_byte_pieces(trained_vocab: dict[str, int], num_specials: int) -> dict[str, int]:
    """Put `<0x00>`..`<0xFF>` right after the special tokens, as Llama-2 does, and shift the rest."""
    ordered = sorted(trained_vocab, key=trained_vocab.__getitem__)
    if any(piece in trained_vocab for piece in BYTE_PIECES):
        raise ValueError("trained vocabulary already holds byte pieces")
    tokens = ordered[:num_specials] + list(BYTE_PIECES) + ordered[num_specials:]
    return {token: index for index, token in enumerate(tokens)}


def _tokenizer_config(style: str, model_max_length: int) -> dict:
    added = {
        str(token_id): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for token_id, content in enumerate(special_tokens(style))
    }
    return {
        "add_bos_token": style == "metaspace",
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "bos_token": BOS,
        "chat_template": CHAT_TEMPLATE,
        # Cleanup would rewrite " ." to "." on decode and break exact round trips.
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS,
        "model_max_length": model_max_length,
        "pad_token": PAD,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": UNK if style == "metaspace" else None,
    }


def _added(content: str) -> AddedToken:
    # normalized=False: the `▁` normalizer must not touch "<|user|>" and friends.
    return AddedToken(content, special=True, normalized=False)


def _check_style(style: str) -> None:
    if style not in STYLES:
        raise ValueError(f"unknown tokenizer style {style!r}; expected one of {STYLES}")


def copy_tokenizer(out_dir: str | Path, source: str | Path) -> tuple[str, str]:
    """Write the tokenizer of a real model (a folder or a .gguf file) into `out_dir` as tokenizer.json
    and tokenizer_config.json, so a random model can be built on it; returns (bos, eos) contents."""
    from nudge_engine.model.tokenizer import Tokenizer as ModelTokenizer
    tok = ModelTokenizer(source)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.hf.save(str(out / "tokenizer.json"))
    bos, eos = tok.bos_token or tok.eos_token, tok.eos_token or tok.bos_token
    if bos is None:
        raise ValueError(f"{source}: the tokenizer names neither a bos nor an eos token")
    config = {"add_bos_token": False, "add_eos_token": False, "bos_token": bos, "eos_token": eos, "pad_token": eos,
              "chat_template": tok.chat_template, "clean_up_tokenization_spaces": False,
              "tokenizer_class": "PreTrainedTokenizerFast"}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return bos, eos
