"""Every family's logits through the paged KV path against transformers (eager attention) as the reference.

The reference runs each sequence alone, unpadded, in one forward: the obvious computation. The engine
runs them batched, as one prefill, as prefill + decode, as prefill + k-token chunks, across KV blocks
of several sizes in a fragmented pool, and past Gemma-2's sliding window. Token ids are random, drawn
fresh per test from a generator seeded by the test's id.

Tolerances (error = max |engine - reference| / max |reference| over all positions of a call):
  float32:  error <= 1e-5, every family             (measured 2026-11-28, max over this file's float32
            cases: llama 4.9e-7, llama3 5.5e-7, qwen2 5.4e-7, gemma2 8.9e-7, olmo 1.25e-6, olmo2 8.0e-7;
            8x headroom over the worst. An RMSNorm epsilon 10x off or the interleaved RoPE layout
            fails it: tests/mutation/run_mutations.py plants both)
  bfloat16: error <= 3e-2 against transformers in float32 and in bfloat16; argmax agrees on
            >= 90 % of all positions and on >= 98 % of the positions whose reference top-2 margin
            exceeds SURE_MARGIN logits                (measured: error <= 2e-2, agreement >= 0.96 / 1.0)
  float16:  error <= 1e-2 against float32         (measured <= 2.5e-3)
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    # Before anything imports triton: its standard library is decorated at import, interpreted or not.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import nudge_engine
from nudge_engine.testing import FAMILIES
from nudge_engine.testing.model_factory import GEMMA2_SLIDING_WINDOW

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

FAMILY_NAMES = tuple(FAMILIES)
FP32_TOL = 1e-5
BF16_TOL = 3e-2
FP16_TOL = 1e-2
BF16_AGREE_ALL = 0.90
BF16_AGREE_SURE = 0.98
SURE_MARGIN = 0.5  # logits; the tiny models' logits have std ~4.5 (DEFAULT_PEAKINESS)
NUM_BLOCKS = 128


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: two threads on two shared cores spin more than they compute (20x slower here)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def rng(request) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def random_sequences(rng: torch.Generator, lengths, vocab: int) -> list[list[int]]:
    return [torch.randint(0, vocab, (n,), generator=rng).tolist() for n in lengths]


@pytest.fixture(scope="module")
def hf_model(tiny_model):
    """hf_model(family, run_dtype=torch.float32, **folder_kw) -> transformers model, loaded once per module."""
    cache = {}

    def get(family: str, run_dtype: torch.dtype = torch.float32, **kw):
        key = (family, run_dtype, tuple(sorted(kw.items())))
        if key not in cache:
            folder = tiny_model(family, **kw)
            model = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager",
                                                                      dtype=run_dtype)
            cache[key] = model.eval()
        return cache[key]

    return get


@pytest.fixture(scope="module")
def engine_model(tiny_model):
    """engine_model(family, run_dtype="float32", block_size=16, backend="auto", **folder_kw) -> nudge_engine
    ScoringModel, cached."""
    cache = {}

    def get(family: str, run_dtype: str = "float32", block_size: int = 16, backend: str = "auto", **kw):
        key = (family, run_dtype, block_size, backend, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = nudge_engine.load_model(tiny_model(family, **kw), dtype=run_dtype, num_blocks=NUM_BLOCKS,
                                                 block_size=block_size, attention_backend=backend)
        return cache[key]

    return get


@torch.no_grad()
def reference_logits(model, sequences) -> list[torch.Tensor]:
    """Each sequence alone, unpadded, in one transformers forward: [len, vocab] float32."""
    return [model(torch.tensor([ids])).logits[0].float() for ids in sequences]


def relative_error(outputs, references) -> float:
    out, ref = torch.cat(outputs), torch.cat(references)
    assert out.shape == ref.shape
    return ((out - ref).abs().max() / ref.abs().max()).item()


def score(model, sequences, **kw) -> list[torch.Tensor]:
    outputs = model.score(sequences, **kw)
    assert model.pool.all_free(), "score() leaked KV blocks"
    assert [o.shape[0] for o in outputs] == [len(ids) for ids in sequences]
    return outputs


@contextlib.contextmanager
def fragmented(pool, rng: torch.Generator):
    """Hold a random half of the pool's blocks so the sequences' block tables are scattered and unordered."""
    blocks = [pool.allocate() for _ in range(pool.num_free)]
    order = torch.randperm(len(blocks), generator=rng).tolist()
    held, released = [blocks[i] for i in order[: len(order) // 2]], [blocks[i] for i in order[len(order) // 2:]]
    for block in released:
        pool.decref(block)
    try:
        yield
    finally:
        for block in held:
            pool.decref(block)


# ---- float32: equal to transformers -----------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_one_prefill_of_a_ragged_batch(family, hf_model, engine_model, rng):
    model = engine_model(family)
    sequences = random_sequences(rng, [37, 1, 12, 25, 2], model.config.vocab_size)
    outputs = score(model, sequences)
    assert relative_error(outputs, reference_logits(hf_model(family), sequences)) <= FP32_TOL


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("prefill", [1, 7])
def test_prefill_then_one_decode_token_at_a_time(family, prefill, hf_model, engine_model, rng):
    model = engine_model(family)
    sequences = random_sequences(rng, [30, 19, 8, 4], model.config.vocab_size)
    outputs = score(model, sequences, prefill=prefill, chunk=1)
    assert relative_error(outputs, reference_logits(hf_model(family), sequences)) <= FP32_TOL


# k = 1, 3, 8 on every family; the other k on two families (Gemma-2 for the window, Qwen2 for the biases).
CHUNK_CASES = [(family, k) for family in FAMILY_NAMES for k in (1, 3, 8)] + [
    (family, k) for family in ("gemma2", "qwen2") for k in (2, 4, 5, 6, 7)
]


@pytest.mark.parametrize(("family", "k"), CHUNK_CASES)
def test_prefill_then_chunks_of_k_tokens(family, k, hf_model, engine_model, rng):
    model = engine_model(family)
    # Lengths leave partial last chunks and sequences that finish while others still run.
    sequences = random_sequences(rng, [33, 22, 13, 6], model.config.vocab_size)
    outputs = score(model, sequences, prefill=5, chunk=k)
    assert relative_error(outputs, reference_logits(hf_model(family), sequences)) <= FP32_TOL


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("block_size", [16, 4, 5])
@pytest.mark.parametrize(("prefill", "chunk"), [(None, None), (11, 6)])
def test_long_sequences_across_blocks_and_the_sliding_window(family, block_size, prefill, chunk, hf_model,
                                                              engine_model, rng):
    model = engine_model(family, block_size=block_size)
    lengths = [40, 34, 26]  # each crosses the window and a block boundary; the longest, two 16-token blocks
    assert max(lengths) > 2 * 16 and min(lengths) > GEMMA2_SLIDING_WINDOW + block_size
    sequences = random_sequences(rng, lengths, model.config.vocab_size)
    with fragmented(model.pool, rng):
        outputs = model.score(sequences, prefill=prefill, chunk=chunk)
    assert model.pool.all_free()
    assert relative_error(outputs, reference_logits(hf_model(family), sequences)) <= FP32_TOL


def test_gemma2_window_changes_the_reference(hf_model, rng):
    """The window test can fail: past the window, a Gemma-2 that attends everywhere differs a lot."""
    windowed, full = hf_model("gemma2"), hf_model("gemma2", sliding_window=64)
    assert windowed.config.sliding_window == GEMMA2_SLIDING_WINDOW and full.config.sliding_window == 64
    sequences = random_sequences(rng, [40], windowed.config.vocab_size)
    (a,), (b,) = reference_logits(windowed, sequences), reference_logits(full, sequences)
    w = GEMMA2_SLIDING_WINDOW
    assert torch.allclose(a[:w], b[:w], rtol=0, atol=1e-5)  # same weights: equal while every key is in the window
    assert (a[w:] - b[w:]).abs().max() / a.abs().max() > 100 * FP32_TOL


def test_gemma2_engine_follows_a_wider_window(hf_model, engine_model, rng):
    model = engine_model("gemma2", sliding_window=64)
    sequences = random_sequences(rng, [40, 21], model.config.vocab_size)
    outputs = score(model, sequences, prefill=9, chunk=4)
    assert relative_error(outputs, reference_logits(hf_model("gemma2", sliding_window=64), sequences)) <= FP32_TOL


@pytest.mark.parametrize("family", ["llama", "gemma2"])
@pytest.mark.parametrize("checkpoint_dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoint_runs_in_float32(family, checkpoint_dtype, hf_model, engine_model, rng):
    model = engine_model(family, dtype=checkpoint_dtype)
    sequences = random_sequences(rng, [29, 11], model.config.vocab_size)
    outputs = score(model, sequences, prefill=6, chunk=3)
    assert relative_error(outputs, reference_logits(hf_model(family, dtype=checkpoint_dtype), sequences)) <= FP32_TOL


# ---- the Triton backend (fused per-layer kernels + paged attention; interpreted on the CPU) ----------


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize(("prefill", "chunk"), [(9, 1), (4, 3)])
def test_triton_backend_equals_transformers(family, prefill, chunk, hf_model, engine_model, rng):
    """Short sequences (the interpreter is slow) that still cross a KV block (size 5) and Gemma-2's window:
    (9, 1) runs the decode kernels, (4, 3) the general attention kernel on k-token chunks."""
    model = engine_model(family, block_size=5, backend="triton")
    assert model.runner.backend.name == "triton"
    sequences = random_sequences(rng, [14, 3, 11], model.config.vocab_size)
    with fragmented(model.pool, rng):
        outputs = model.score(sequences, prefill=prefill, chunk=chunk)
    assert model.pool.all_free()
    assert relative_error(outputs, reference_logits(hf_model(family), sequences)) <= FP32_TOL


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_triton_backend_in_bfloat16(family, hf_model, engine_model, rng):
    """The fused kernels' roundings in bfloat16: within the bfloat16 tolerance of transformers (float32)."""
    model = engine_model(family, run_dtype="bfloat16", backend="triton")
    sequences = random_sequences(rng, [12, 7], model.config.vocab_size)
    outputs = model.score(sequences, prefill=8, chunk=2)
    assert model.pool.all_free()
    assert relative_error(outputs, reference_logits(hf_model(family), sequences)) <= BF16_TOL


# ---- bfloat16 and float16 ----------------------------------------------------------------------------


def argmax_agreement(outputs, references) -> tuple[float, float, int]:
    """(agreement over all positions, agreement where the reference's top-2 margin > SURE_MARGIN, #sure)."""
    out, ref = torch.cat(outputs), torch.cat(references)
    agree = out.argmax(-1) == ref.argmax(-1)
    top2 = ref.topk(2, dim=-1).values
    sure = top2[:, 0] - top2[:, 1] > SURE_MARGIN
    return agree.float().mean().item(), agree[sure].float().mean().item(), int(sure.sum())


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_bfloat16_greedy_agrees_with_transformers(family, hf_model, engine_model, rng):
    model = engine_model(family, run_dtype="bfloat16")
    assert model.runner.kv_cache.dtype == torch.bfloat16
    assert next(model.runner.model.parameters()).dtype == torch.bfloat16
    sequences = random_sequences(rng, [40, 40, 40, 40], model.config.vocab_size)  # 160 positions
    outputs = score(model, sequences, prefill=8, chunk=3)
    for run_dtype in (torch.float32, torch.bfloat16):
        references = reference_logits(hf_model(family, run_dtype), sequences)
        assert relative_error(outputs, references) <= BF16_TOL, run_dtype
        agree_all, agree_sure, num_sure = argmax_agreement(outputs, references)
        assert num_sure >= 0.4 * 160, "too few clear positions for the agreement to mean anything"
        assert agree_all >= BF16_AGREE_ALL, run_dtype
        assert agree_sure >= BF16_AGREE_SURE, run_dtype


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_float16_loads_and_runs(family, hf_model, engine_model, rng):
    model = engine_model(family, run_dtype="float16")
    assert model.runner.kv_cache.dtype == torch.float16
    sequences = random_sequences(rng, [36, 14], model.config.vocab_size)
    outputs = score(model, sequences, prefill=6, chunk=4)
    assert all(o.dtype == torch.float32 and o.isfinite().all() for o in outputs)
    assert relative_error(outputs, reference_logits(hf_model(family), sequences)) <= FP16_TOL


# ---- checkpoints split into shards -------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_sharded_and_single_file_checkpoints_give_identical_logits(family, tiny_model, engine_model, rng):
    single, sharded = tiny_model(family), tiny_model(family, shards=3)
    assert [p.name for p in single.glob("*.safetensors")] == ["model.safetensors"]
    assert len(list(sharded.glob("model-0000?-of-00003.safetensors"))) == 3
    assert (sharded / "model.safetensors.index.json").is_file() and not (sharded / "model.safetensors").exists()
    a, b = engine_model(family), engine_model(family, shards=3)
    params_a, params_b = dict(a.runner.model.named_parameters()), dict(b.runner.model.named_parameters())
    assert params_a.keys() == params_b.keys()
    assert all(torch.equal(params_a[name], params_b[name]) for name in params_a)
    sequences = random_sequences(rng, [31, 9], a.config.vocab_size)
    for kw in ({}, {"prefill": 4, "chunk": 3}):
        assert all(torch.equal(x, y) for x, y in zip(score(a, sequences, **kw), score(b, sequences, **kw)))
