"""The tiny model and tokenizer factory, checked against transformers as the reference loader."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tokenizers import Tokenizer

from nudge_engine.testing import FAMILIES, STYLES, make_tiny_model, make_tiny_pair, make_tokenizer
from nudge_engine.testing import tokenizer_factory

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

REPO_ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "llama3": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "olmo": "OlmoForCausalLM",
    "olmo2": "Olmo2ForCausalLM",
}
ROUND_TRIP_TEXTS = [
    "Hello world, the lighthouse keeper climbed the stairs.",
    "  two leading spaces, and two trailing  ",
    "tabs\tand\nnew\n\nlines\r\n",
    "café naïve jalapeño Grüße",
    "日本語の文章 and 中文 in one line",
    "emoji 🙂🚀 and unseen ones 🦀🧪, Korean 안녕하세요, Hindi नमस्ते",
    "",
]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """make_tiny_model with the folder made once per session for each argument set."""
    made: dict[str, Path] = {}

    def get(family: str, **kw) -> Path:
        key = repr((family, sorted(kw.items())))
        if key not in made:
            made[key] = make_tiny_model(tmp_path_factory.mktemp(family), family, **kw)
        return made[key]

    return get


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    folders = {style: tmp_path_factory.mktemp(f"tok-{style}") for style in STYLES}
    for style, folder in folders.items():
        make_tokenizer(folder, style)
    return folders


def random_prompts(batch: int = 8, length: int = 24, vocab: int = 512, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=generator)  # [batch, length]


def load(folder: Path):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    return model.eval(), info


@torch.no_grad()
def logits_of(folder: Path, prompts: torch.Tensor) -> torch.Tensor:
    model, _ = load(folder)
    return model(prompts).logits.float()  # [batch, length, vocab]


def files_of(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


# ---------------------------------------------------------------- tokenizers


@pytest.mark.parametrize("style", STYLES)
def test_tokenizer_round_trips_and_agrees_with_transformers(tokenizer_dir, style):
    raw = Tokenizer.from_file(str(tokenizer_dir[style] / "tokenizer.json"))
    hf = transformers.AutoTokenizer.from_pretrained(tokenizer_dir[style])
    for text in ROUND_TRIP_TEXTS:
        ids = raw.encode(text, add_special_tokens=False).ids
        assert raw.decode(ids, skip_special_tokens=False) == text
        assert hf.decode(ids) == text
        assert hf(text, add_special_tokens=False).input_ids == ids
        # With the default post-processing (bos for metaspace) both still agree.
        assert hf(text).input_ids == raw.encode(text).ids
        assert hf.decode(hf(text).input_ids, skip_special_tokens=True) == text


@pytest.mark.parametrize("style", STYLES)
def test_markers_inside_text_stay_single_tokens(tokenizer_dir, style):
    raw = Tokenizer.from_file(str(tokenizer_dir[style] / "tokenizer.json"))
    hf = transformers.AutoTokenizer.from_pretrained(tokenizer_dir[style])
    text = "a<|user|>b"
    ids = raw.encode(text, add_special_tokens=False).ids
    assert raw.token_to_id("<|user|>") in ids and hf(text, add_special_tokens=False).input_ids == ids
    # Llama-2's normalizer prepends `▁` to every stretch of text, also the one after a special
    # token, so metaspace decodes one extra space there (as the real Llama-2 tokenizer.json does).
    expected = "a<|user|> b" if style == "metaspace" else text
    assert raw.decode(ids, skip_special_tokens=False) == hf.decode(ids) == expected


@pytest.mark.parametrize("style", STYLES)
def test_tokenizer_round_trips_random_text(tokenizer_dir, style):
    raw = Tokenizer.from_file(str(tokenizer_dir[style] / "tokenizer.json"))
    rng = random.Random(7)
    # Printable ASCII, whitespace, Latin-1, Greek, CJK, Hangul and emoji; "▁" excluded: the
    # metaspace decoder maps it to a space, as Llama-2's does.
    pools = [range(0x20, 0x7F), [0x09, 0x0A, 0x0D], range(0xA0, 0x100), range(0x391, 0x3CA),
             range(0x4E00, 0x4E80), range(0xAC00, 0xAC40), range(0x1F600, 0x1F650)]
    for _ in range(100):
        text = "".join(chr(rng.choice(rng.choice(pools))) for _ in range(rng.randint(1, 40)))
        ids = raw.encode(text, add_special_tokens=False).ids
        assert raw.decode(ids) == text, text


def test_metaspace_falls_back_to_bytes(tokenizer_dir):
    raw = Tokenizer.from_file(str(tokenizer_dir["metaspace"] / "tokenizer.json"))
    vocab = raw.get_vocab()
    assert all(f"<0x{b:02X}>" in vocab for b in range(256))
    assert raw.encode("🦀", add_special_tokens=False).tokens == ["▁", "<0xF0>", "<0x9F>", "<0xA6>", "<0x80>"]
    assert "<unk>" not in raw.encode("🦀 안녕").tokens
    assert raw.encode("the keeper", add_special_tokens=False).tokens[0].startswith("▁")


def test_bytelevel_marks_spaces_with_g(tokenizer_dir):
    raw = Tokenizer.from_file(str(tokenizer_dir["bytelevel"] / "tokenizer.json"))
    tokens = raw.encode("the keeper of the light").tokens
    assert any(token.startswith("Ġ") for token in tokens)
    assert raw.token_to_id("<s>") == 0  # byte-level: no bos added, ids start at the specials


@pytest.mark.parametrize("style", STYLES)
def test_special_tokens_and_chat_template(tokenizer_dir, style):
    hf = transformers.AutoTokenizer.from_pretrained(tokenizer_dir[style])
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == ("<s>", "</s>", "<pad>")
    assert hf.unk_token == ("<unk>" if style == "metaspace" else None)
    starts_with_bos = hf("hi").input_ids[0] == hf.bos_token_id
    assert starts_with_bos == (style == "metaspace")  # add_bos_token: Llama-2 style only
    for marker in tokenizer_factory.CHAT_MARKERS:
        assert len(hf(marker, add_special_tokens=False).input_ids) == 1
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<s><|system|>\nBe brief.<|end|>\n<|user|>\nHi there<|end|>\n<|assistant|>\n"
    assert not hf.apply_chat_template(messages, tokenize=False).endswith("<|assistant|>\n")


def test_tokenizer_refuses_sizes_the_corpus_cannot_give(tmp_path):
    with pytest.raises(ValueError, match="cannot be trained"):
        make_tokenizer(tmp_path, "metaspace", 300)  # 256 byte pieces + specials + alphabet exceed 300
    with pytest.raises(ValueError, match="cannot be trained"):
        make_tokenizer(tmp_path, "bytelevel", 100_000)


@pytest.mark.parametrize("style", STYLES)
def test_tokenizer_training_is_deterministic(tmp_path, style):
    tokenizer_factory._trained_tokenizer_json.cache_clear()
    make_tokenizer(tmp_path / "a", style)
    tokenizer_factory._trained_tokenizer_json.cache_clear()
    make_tokenizer(tmp_path / "b", style)
    assert files_of(tmp_path / "a") == files_of(tmp_path / "b")


# ---------------------------------------------------------------- models


@pytest.mark.parametrize("family", list(FAMILIES))
def test_model_folder_tokenizer_matches_tokenizer_json(tiny_model, family):
    """AutoTokenizer picks a class by model_type (Qwen2Tokenizer for qwen2); it must still agree."""
    folder = tiny_model(family)
    raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    for text in ROUND_TRIP_TEXTS + ["numbers 1234 and 56.7", "it's the keeper's"]:
        assert hf(text).input_ids == raw.encode(text).ids
        assert hf.decode(hf(text).input_ids) == text


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_loads_cleanly_and_runs(tiny_model, family):
    folder = tiny_model(family)
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == [ARCHITECTURES[family]]
    model, info = load(folder)
    assert type(model).__name__ == ARCHITECTURES[family]
    assert {key: value for key, value in info.items() if value} == {}
    logits = logits_of(folder, random_prompts(batch=2, length=20))
    assert logits.shape == (2, 20, config["vocab_size"]) and torch.isfinite(logits).all()
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == config["eos_token_id"] == 1


# Not qwen2: transformers 5 rebuilds every Qwen2 folder's tokenizer as Qwen2's byte-level one.
@pytest.mark.parametrize("family", ["llama", "gemma2", "olmo"])
def test_metaspace_model_folder_loads(tiny_model, family):
    folder = tiny_model(family, tokenizer="metaspace")
    _, info = load(folder)
    assert {key: value for key, value in info.items() if value} == {}
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    assert hf.decode(hf("déjà vu 🦀").input_ids, skip_special_tokens=True) == "déjà vu 🦀"
    assert json.loads((folder / "config.json").read_text())["bos_token_id"] == hf.bos_token_id


def test_checkpoint_layout_follows_each_family(tiny_model):
    def names(family: str) -> set[str]:
        with safe_open(str(tiny_model(family) / "model.safetensors"), "pt") as handle:
            return set(handle.keys())

    assert "lm_head.weight" in names("llama") and "lm_head.weight" not in names("qwen2")
    assert "model.layers.0.self_attn.q_proj.bias" in names("qwen2")
    assert "model.layers.0.self_attn.o_proj.bias" not in names("qwen2")
    assert not any("norm" in name for name in names("olmo"))  # non-parametric LayerNorm
    assert "model.layers.1.self_attn.k_norm.weight" in names("olmo2")
    assert not any("input_layernorm" in name for name in names("olmo2"))
    assert "model.layers.0.pre_feedforward_layernorm.weight" in names("gemma2")


def test_config_fields_reach_transformers(tiny_model):
    gemma = transformers.AutoConfig.from_pretrained(tiny_model("gemma2"))
    assert gemma.sliding_window == 8 and gemma.layer_types == ["sliding_attention", "full_attention"]
    assert gemma.head_dim == 32 and gemma.query_pre_attn_scalar == 16
    assert gemma.final_logit_softcapping == 30.0 and gemma.attn_logit_softcapping == 50.0
    assert transformers.AutoConfig.from_pretrained(tiny_model("olmo")).clip_qkv == 2.0
    llama3 = transformers.AutoConfig.from_pretrained(tiny_model("llama3"))
    rope = getattr(llama3, "rope_parameters", None) or llama3.rope_scaling
    assert rope["rope_type"] == "llama3" and rope["original_max_position_embeddings"] == 64
    assert transformers.AutoConfig.from_pretrained(tiny_model("qwen2")).tie_word_embeddings is True


@pytest.mark.parametrize(
    ("family", "override", "positions_unchanged"),
    [
        ("llama3", {"rope_scaling": None}, 1),  # position 0 has no rotation to scale
        ("olmo", {"clip_qkv": None}, 0),
        ("gemma2", {"sliding_window": 512}, 8),  # the window (8) first hides a key at position 8
    ],
)
def test_family_quirks_change_the_output(tiny_model, family, override, positions_unchanged):
    prompts = random_prompts(batch=2, length=24)
    quirky = logits_of(tiny_model(family), prompts)
    plain = logits_of(tiny_model(family, **override), prompts)
    if positions_unchanged:
        torch.testing.assert_close(quirky[:, :positions_unchanged], plain[:, :positions_unchanged])
    assert (quirky[:, positions_unchanged:] - plain[:, positions_unchanged:]).abs().max() > 1e-3


def test_sharded_folder_matches_single_file(tiny_model):
    single, sharded = tiny_model("llama3"), tiny_model("llama3", shards=3)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shard_files = sorted(path.name for path in sharded.glob("model-*.safetensors"))
    assert shard_files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert sorted(set(index["weight_map"].values())) == shard_files
    assert not (sharded / "model.safetensors").exists()
    whole = load_file(str(single / "model.safetensors"))
    assert set(index["weight_map"]) == set(whole)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in whole.values())
    prompts = random_prompts()
    assert torch.equal(logits_of(single, prompts), logits_of(sharded, prompts))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_peakiness_spreads_top1_probability(tiny_model, family):
    top1 = logits_of(tiny_model(family), random_prompts(batch=16)).softmax(-1).amax(-1).flatten()
    q10, q90 = torch.quantile(top1, torch.tensor([0.1, 0.9])).tolist()
    assert q10 < 0.3 and q90 > 0.6, (q10, q90)


@pytest.mark.parametrize(("base", "nudger"), [("llama", "llama"), ("gemma2", "gemma2"), ("olmo2", "llama3")])
def test_pair_agreement_knob(tmp_path, base, nudger):
    prompts = random_prompts(batch=8)

    def argmax_agreement(agreement: float) -> float:
        base_dir, nudger_dir = make_tiny_pair(tmp_path / str(agreement), base, nudger, agreement=agreement)
        same = logits_of(base_dir, prompts).argmax(-1) == logits_of(nudger_dir, prompts).argmax(-1)
        return same.float().mean().item()

    assert argmax_agreement(0.9) > argmax_agreement(0.0) + 0.3


def test_pair_shares_tokenizer_embedding_and_head(tmp_path):
    base, nudger = make_tiny_pair(tmp_path, "llama", "qwen2", tokenizer="metaspace", num_layers=4)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (base / name).read_bytes() == (nudger / name).read_bytes()
    base_weights, nudger_weights = load_file(str(base / "model.safetensors")), load_file(str(nudger / "model.safetensors"))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(base_weights[name], nudger_weights[name])
    assert not torch.equal(base_weights["model.layers.0.mlp.up_proj.weight"], nudger_weights["model.layers.0.mlp.up_proj.weight"])
    config = json.loads((nudger / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["tie_word_embeddings"] is False


def test_dtype_padding_and_eos_list(tiny_model):
    folder = tiny_model("gemma2", dtype="bfloat16", vocab_size=576, eos_token_id=[1, 6])
    model, info = load(folder)
    assert {key: value for key, value in info.items() if value} == {}
    assert model.config.vocab_size == 576
    assert {t.dtype for t in load_file(str(folder / "model.safetensors")).values()} == {torch.bfloat16}
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == [1, 6]
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert torch.isfinite(model(random_prompts(batch=1)).logits.float()).all()


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="family"):
        make_tiny_model(tmp_path, "gpt2")
    with pytest.raises(ValueError, match="sliding"):
        make_tiny_model(tmp_path, "llama", sliding_window=4)
    with pytest.raises(ValueError, match="vocab_size"):
        make_tiny_model(tmp_path, "llama", vocab_size=100)
    with pytest.raises(ValueError, match="agreement"):
        make_tiny_pair(tmp_path, agreement=1.5)
    with pytest.raises(ValueError, match="hidden_size"):
        make_tiny_pair(tmp_path, "llama", "olmo2", nudger_overrides={"hidden_size": 32})


def test_runs_are_byte_identical_across_processes(tmp_path, tiny_model):
    """A fresh interpreter writes the same bytes, and imports no transformers to do it."""
    script = (
        "import sys\n"
        "from nudge_engine.testing import make_tiny_model\n"
        f"make_tiny_model({str(tmp_path / 'a')!r}, 'olmo2', shards=2)\n"
        f"make_tiny_model({str(tmp_path / 'b')!r}, 'qwen2', tokenizer='metaspace')\n"
        "assert 'transformers' not in sys.modules\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=120)
    assert files_of(tmp_path / "a") == files_of(tiny_model("olmo2", shards=2))
    assert files_of(tmp_path / "b") == files_of(tiny_model("qwen2", tokenizer="metaspace"))
