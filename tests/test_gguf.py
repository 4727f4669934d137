"""GGUF checkpoints: tiny models of every family written as llama.cpp writes them load to the same
logits as their folders and as transformers' own GGUF loader; every tensor type dequantizes; the
sentencepiece tokenizer is rebuilt from scores; bad files get a ModelFolderError naming the problem."""
from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf")

import nudge_engine  # noqa: E402
from nudge_engine import ModelFolderError  # noqa: E402
from nudge_engine.model import loader  # noqa: E402
from nudge_engine.model.config import load_config  # noqa: E402
from nudge_engine.testing.tokenizer_factory import corpus_lines  # noqa: E402
from nudge_engine.model.tokenizer import Tokenizer  # noqa: E402

from gguf_convert import write_gguf  # noqa: E402
from reference import hf_model  # noqa: E402

TOL = 1e-4      # max|diff| / max|ref|, float32, as tests/test_models.py
PROMPT = list(range(5, 45))   # 40 tokens: crosses KV blocks and Gemma-2's window of 8
# Every tensor type the loader promises, in one file (K types need rows of 256: hidden 256).
MIXED_TYPES = {"token_embd.weight": "F16", "output.weight": "BF16", "blk.0.attn_q.weight": "Q4_K",
               "blk.0.attn_k.weight": "Q5_K", "blk.0.attn_v.weight": "Q6_K", "blk.0.attn_output.weight": "Q8_0",
               "blk.0.ffn_gate.weight": "Q4_0", "blk.0.ffn_up.weight": "Q4_1", "blk.0.ffn_down.weight": "Q5_0",
               "blk.1.attn_q.weight": "Q5_1", "blk.1.attn_k.weight": "Q2_K", "blk.1.attn_v.weight": "Q3_K",
               "blk.1.ffn_down.weight": "Q6_K"}
FAMILY_KW = {"llama": {}, "qwen2": {}, "olmo": {}, "olmo2": {},
             # llama.cpp scales Gemma-2 queries by head_dim (hidden/heads only for the 27B)
             "gemma2": {"query_pre_attn_scalar": 32}}


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def gguf_of(tiny_model, tmp_path_factory):
    """gguf_of(family, types=None, tokenizer="bytelevel", **kw) -> (folder, .gguf), cached."""
    cache = {}

    def make(family: str, types: dict | None = None, tokenizer: str = "bytelevel", **kw):
        key = (family, tuple(sorted((types or {}).items())), tokenizer, tuple(sorted(kw.items())))
        if key not in cache:
            folder = tiny_model(family, tokenizer, **kw)
            out = tmp_path_factory.mktemp(f"gguf-{family}") / f"{family}.gguf"
            cache[key] = folder, write_gguf(folder, out, types, "gpt2" if tokenizer == "bytelevel" else "llama")
        return cache[key]

    return make


@pytest.mark.parametrize("family", sorted(FAMILY_KW))
def test_every_family_loads_to_the_same_logits_as_its_folder(gguf_of, family):
    folder, path = gguf_of(family, **FAMILY_KW[family])
    want, got = load_config(folder), load_config(path)
    for field in ("architecture", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "num_kv_heads", "head_dim", "tie_word_embeddings", "eos_token_ids", "bos_token_id"):
        assert getattr(got, field) == getattr(want, field), field
    assert got.rope.theta == pytest.approx(want.rope.theta) and got.norm_eps == pytest.approx(want.norm_eps)
    ref = nudge_engine.load_model(folder).score([PROMPT, PROMPT[:7]])
    out = nudge_engine.load_model(path).score([PROMPT, PROMPT[:7]])
    for o, r in zip(out, ref):
        assert rel_diff(o, r) <= 1e-6   # float32 weights through F32 tensors: the same numbers


@pytest.mark.parametrize("family,kw", [
    ("llama", {}),                                   # Q/K rows permuted by llama.cpp, unpermuted on load
    ("qwen2", {}),
    ("gemma2", {"head_dim": 256}),                   # transformers assumes 256 where llama.cpp reads head_dim
    ("llama", {"hidden_size": 256, "intermediate_size": 256, "types": MIXED_TYPES}),
], ids=["llama", "qwen2", "gemma2", "llama-every-tensor-type"])
def test_logits_equal_transformers_reading_the_same_gguf(gguf_of, family, kw):
    kw = dict(kw)
    _, path = gguf_of(family, kw.pop("types", None), **kw)
    types = {t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    if family == "llama" and "hidden_size" in kw:
        assert set(MIXED_TYPES.values()) | {"F32"} == types
    ours = nudge_engine.load_model(path).score([PROMPT])[0]
    with torch.no_grad():
        ref = hf_model(path)(torch.tensor([PROMPT])).logits[0]
    assert rel_diff(ours, ref) <= TOL


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dequantized_to_the_requested_dtype(gguf_of, dtype):
    _, path = gguf_of("llama", MIXED_TYPES, hidden_size=256, intermediate_size=256)
    got = dict(nudge_engine.load_model(path, dtype=dtype).runner.model.named_parameters())
    want = dict(nudge_engine.load_model(path).runner.model.named_parameters())
    for name, param in got.items():   # dequantized in float32, then rounded once to the dtype
        assert param.dtype == getattr(torch, dtype) and torch.equal(param, want[name].to(param.dtype)), name


@pytest.mark.parametrize("family", ["llama", "gemma2"])   # Gemma: no dummy prefix, merges by token order
def test_sentencepiece_tokenizer_rebuilt_from_scores_matches_transformers(gguf_of, family):
    from transformers import AutoTokenizer
    folder, path = gguf_of(family, tokenizer="metaspace", **FAMILY_KW[family])
    ours = Tokenizer(path)
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    texts = corpus_lines() + ["日本語 テキスト", "tab\tand\nnewline", "x"]
    for text in texts:
        assert ours.encode(text) == ref.encode(text), text
        assert ours.decode(ours.encode(text)) == text
    assert ours.bos_token == "<s>" and ours.chat_template == Tokenizer(folder).chat_template
    if family == "gemma2":
        return
    # llama.cpp (and sentencepiece) prepend the space after a special token and before leading spaces
    # too; transformers' GGUF tokenizer does not. The folder's own tokenizer agrees with llama.cpp.
    for text in ("  two  spaces", "<|user|>\nhi<|end|>"):
        assert ours.encode(text) == Tokenizer(folder).encode(text)


def test_engine_serves_a_gguf_and_the_cli_generates_from_it(gguf_of, capsys):
    from nudge_engine import NudgeEngine, SamplingParams, cli
    folder, path = gguf_of("llama")
    params = SamplingParams(max_tokens=8, temperature=0)
    out = NudgeEngine(path).generate([PROMPT[:10]], params)[0]
    assert out.token_ids == NudgeEngine(folder).generate([PROMPT[:10]], params)[0].token_ids
    assert cli.main(["generate", "--base", str(path), "--prompt", "Once upon a time", "--max-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()


def test_gguf_is_imported_only_for_gguf_paths(tiny_model):
    folder = tiny_model("llama")
    code = ("import sys; from nudge_engine import NudgeEngine, SamplingParams; "
            f"NudgeEngine({str(folder)!r}).generate('hi', SamplingParams(max_tokens=2)); "
            "assert 'gguf' not in sys.modules, 'gguf imported for a folder'")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


# ---------------------------------------------------------------- bad files
@pytest.fixture
def refuses(monkeypatch):
    """refuses(path, *fragments): load_model raises ModelFolderError holding every fragment, before any weights load."""
    def never_called(*args, **kw):
        raise AssertionError("load_weights reached: the file's problem was not found on its metadata")

    monkeypatch.setattr(loader, "load_weights", never_called)

    def check(path: Path, *fragments: str) -> str:
        with pytest.raises(ModelFolderError) as info:
            nudge_engine.load_model(path)
        for fragment in fragments:
            assert fragment in str(info.value)
        return str(info.value)

    return check


def _copy(gguf_of, tmp_path) -> tuple[Path, bytes]:
    _, path = gguf_of("llama")
    data = path.read_bytes()
    return tmp_path / "model.gguf", data


@pytest.mark.parametrize("keep", [0.3, 0.9, 0.99])
def test_truncated_gguf(gguf_of, tmp_path, refuses, keep):
    target, data = _copy(gguf_of, tmp_path)
    target.write_bytes(data[:int(len(data) * keep)])
    refuses(target, str(target), "truncated")


def test_not_a_gguf_and_missing_file(tmp_path, refuses):
    bad = tmp_path / "weights.gguf"
    bad.write_bytes(b"PK\x03\x04 not a gguf at all")
    refuses(bad, "not a GGUF file")
    refuses(tmp_path / "nowhere.gguf", "no such GGUF file")


def test_unknown_tensor_type_number(gguf_of, tmp_path, refuses):
    target, data = _copy(gguf_of, tmp_path)
    name = b"token_embd.weight"
    at = data.index(name) + len(name)
    (n_dims,) = struct.unpack_from("<I", data, at)
    type_at = at + 4 + 8 * n_dims
    data = data[:type_at] + struct.pack("<I", 99) + data[type_at + 4:]
    target.write_bytes(data)
    refuses(target, str(target), "99")


def test_tensor_type_that_cannot_be_dequantized(tiny_model, tmp_path, refuses):
    folder = tiny_model("llama", hidden_size=256, intermediate_size=256)
    path = write_gguf(folder, tmp_path / "iq.gguf", {"blk.0.attn_q.weight": "Q4_K"})
    data = bytearray(path.read_bytes())
    name = b"blk.0.attn_q.weight"
    at = data.index(name) + len(name)
    (n_dims,) = struct.unpack_from("<I", data, at)
    type_at = at + 4 + 8 * n_dims
    # A type gguf knows but the loader does not promise (IQ4_XS blocks are smaller: nothing overruns the file).
    struct.pack_into("<I", data, type_at, gguf.GGMLQuantizationType.IQ4_XS)
    path.write_bytes(bytes(data))
    refuses(path, "blk.0.attn_q.weight", "IQ4_XS")


def test_unknown_architecture(tiny_model, tmp_path, refuses):
    path = write_gguf(tiny_model("llama"), tmp_path / "m.gguf", arch="mamba")
    refuses(path, "architecture 'mamba' is not supported", "llama")


def test_missing_tensor(tiny_model, tmp_path, refuses):
    folder = tiny_model("llama")
    path = write_gguf(folder, tmp_path / "m.gguf", drop=("blk.1.ffn_gate.weight",))
    refuses(path, "missing tensor for parameter model.layers.1.mlp.gate_up_proj.weight (shard gate)")


def test_unsupported_tokenizer_is_named(gguf_of, tmp_path, monkeypatch):
    from nudge_engine.model import gguf_tokenizer
    _, path = gguf_of("llama")
    monkeypatch.delitem(gguf_tokenizer.PRE_SPLITS, "default")
    with pytest.raises(ModelFolderError, match="pre-tokenizer 'default' is not supported"):
        Tokenizer(path)


def test_cli_reports_a_bad_gguf_in_one_line(gguf_of, tmp_path, capsys):
    from nudge_engine import cli
    target, data = _copy(gguf_of, tmp_path)
    target.write_bytes(data[:len(data) // 2])
    assert cli.main(["generate", "--base", str(target), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert "truncated" in err and str(target) in err and len(err.splitlines()) == 1
