"""Tensor parallelism on the CPU over gloo (nudge_engine/distributed/, layers/parallel.py).

The reference is one process: the same checkpoint loaded whole. Spawning is the slow part, so one
group of 2 and one of 4 processes each run every family, and one engine serves several scenarios.
"""
from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

os.environ.setdefault("TRITON_INTERPRET", "1")   # before any kernel is decorated: Triton per rank on the CPU
import torch.multiprocessing as mp

from nudge_engine import NudgeEngine
from nudge_engine.engine.async_errors import EngineDeadError, EngineStepError
from nudge_engine.engine.async_nudge_engine import AsyncNudgeEngine
from nudge_engine.engine.sampling_params import SamplingParams
from nudge_engine.layers.parallel import SINGLE, TensorParallel
from nudge_engine.model.graph_runner import GraphRunner, ReplayCapture
from nudge_engine.model.loader import load_causal_lm
from nudge_engine.model.model_runner import ModelRunner, StepInputs
from nudge_engine.distributed.group import free_tcp_address
from nudge_engine.distributed.launch import WorkerDiedError
from nudge_engine.distributed.shard import shard_config

# family -> (KV heads, vocab size): fewer KV heads than 4 ranks replicates them; 517 rows pad the vocabulary.
FAMILY_SHAPES = {"llama": (2, 517), "llama3": (2, None), "qwen2": (1, None), "gemma2": (2, 517),
                 "olmo": (4, None), "olmo2": (4, 519)}
BLOCK_SIZE = 4
PROMPTS = ([5, 9, 14, 3, 8, 21, 7, 2, 11, 30], [40, 6, 17, 99, 3, 12, 8])   # two sequences, several blocks
DEAD_ENGINE_TIMEOUT_S = 30.0


def _passes(vocab: int):
    """A prefill of both prompts, then one decode token each: the second pass reads the paged cache."""
    lens = [len(p) for p in PROMPTS]
    blocks = [list(range(0, 3)), list(range(3, 6))]
    tables = torch.tensor(blocks, dtype=torch.int32)
    slots = [b[i // BLOCK_SIZE] * BLOCK_SIZE + i % BLOCK_SIZE for b, n in zip(blocks, lens) for i in range(n)]
    prefill = StepInputs(torch.tensor([t for p in PROMPTS for t in p]), torch.tensor([i for n in lens for i in range(n)]),
                         torch.tensor(slots), tables, torch.tensor([0, lens[0], sum(lens)], dtype=torch.int32),
                         torch.tensor(lens, dtype=torch.int32), max(lens), max(lens))
    new = [vocab - 1, 1]   # the last row of the vocabulary lives on the last rank
    dslots = [b[n // BLOCK_SIZE] * BLOCK_SIZE + n % BLOCK_SIZE for b, n in zip(blocks, lens)]
    decode = StepInputs(torch.tensor(new), torch.tensor(lens), torch.tensor(dslots), tables,
                        torch.tensor([0, 1, 2], dtype=torch.int32), torch.tensor([n + 1 for n in lens], dtype=torch.int32),
                        1, max(lens) + 1)
    return [(prefill, torch.arange(sum(lens))), (decode, torch.arange(2))]


def _logits(folder, tp, backend: str, graphs: bool = False) -> list[torch.Tensor]:
    """The passes' logits; graphs: the decode pass (2 sequences, a captured size) is replayed instead
    from a graph captured and replayed on the whole padded shape (as on a GPU), its collectives included."""
    model, config = load_causal_lm(folder, "cpu", torch.float32, progress=False, tp=tp)
    runner = ModelRunner(model, shard_config(model, config), torch.device("cpu"), torch.float32, 8, BLOCK_SIZE, backend)
    (prefill, prefill_rows), (decode, decode_rows) = _passes(config.vocab_size)
    out = [runner.forward(prefill, prefill_rows)]
    if not graphs:
        return out + [runner.forward(decode, decode_rows)]
    captured = GraphRunner(runner, 2, [1], ReplayCapture(padded=True), max_blocks_per_seq=4)
    captured.capture_all()   # every rank captures the same sizes in the same order
    captured.replay_step(decode, 2)
    return out + [captured.logits((2, 1), decode_rows)]


def _rank_main(rank: int, size: int, init_method: str, folders: dict, backend: str, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("TRITON_INTERPRET", "1")   # the Triton kernels per rank, interpreted on the CPU
    dist.init_process_group("gloo", init_method=init_method, world_size=size, rank=rank, timeout=timedelta(seconds=60))
    try:
        tp = TensorParallel(rank, size, dist.group.WORLD)
        results = {}
        for family, folder in folders.items():
            try:
                results[family] = _logits(folder, tp, backend) + _logits(folder, tp, backend, graphs=True)[1:]
            except ValueError as e:   # a shape this size cannot split: the error must name it
                results[family] = str(e)
        if rank == 0:
            torch.save(results, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Skips the interpreter's teardown: its destructors (gloo's threads) have aborted a spawned rank
    # now and then after the work was done, which fails the spawn for no reason of ours.
    os._exit(0)


@pytest.fixture(scope="module")
def family_folders(tiny_model, tmp_path_factory):
    """Every family's folder, and Llama as a GGUF file (the loader slices the dequantized tensors)."""
    folders = {f: tiny_model(f, num_kv_heads=kv, **({"vocab_size": v} if v else {})) for f, (kv, v) in FAMILY_SHAPES.items()}
    if importlib.util.find_spec("gguf") is not None:
        sys.path.insert(0, str(Path(__file__).parent))
        from gguf_convert import write_gguf
        folders["llama-gguf"] = write_gguf(folders["llama"], tmp_path_factory.mktemp("tp-gguf") / "llama.gguf", None, "gpt2")
    return folders


TRITON_FAMILIES = ("qwen2", "olmo2")   # one replicated KV head; split KV heads with the sharded QK-norm


@pytest.mark.parametrize("size,backend", [(2, "torch"), (4, "torch"), (2, "triton")])
def test_sharded_logits_match_one_process_for_every_family(size, backend, family_folders, tmp_path):
    if backend == "triton":
        pytest.importorskip("triton")
        family_folders = {f: family_folders[f] for f in TRITON_FAMILIES}
    out = str(tmp_path / "logits.pt")
    mp.spawn(_rank_main, args=(size, free_tcp_address(), family_folders, backend, out), nprocs=size, join=True)
    got = torch.load(out)
    for family, folder in family_folders.items():
        want = _logits(folder, SINGLE, backend)
        if family == "olmo2" and FAMILY_SHAPES[family][0] < size:
            assert "KV heads" in got[family]
            continue
        assert not isinstance(got[family], str), (family, got[family])
        assert len(got[family]) == len(want) + 1
        for g, w in zip(got[family], want + want[1:]):   # the graph-replayed decode pass last
            assert g.shape == w.shape, family
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4, msg=f"{family} at tensor parallel {size}")


def _run_with_abort(engine, prompts, params) -> list:
    """Adds every prompt, aborts the second after two steps, runs the rest to the end."""
    ids = [engine.add_request(p, params) for p in prompts]
    reqs = [engine.requests[i] for i in ids]
    for step in range(1000):
        if step == 2:
            engine.abort(ids[1])
        engine.step()
        if not engine.has_unfinished():
            break
    outs = [r.result() for r in reqs]
    assert outs[1].finish_reason == "abort" and all(o.finish_reason == "length" for o in outs[2:])
    return [(o.token_ids, o.sources, o.finish_reason) for o in outs]


@pytest.mark.parametrize("placement,graphs", [("rank0", False), ("tensor", False), ("rank0", True), ("tensor", True)])
def test_nudged_generation_matches_one_process_with_preemption_and_aborts(placement, graphs, tiny_pair, check_pools):
    """graphs: the sharded engine replays its decode-shaped passes (the CPU's replay emulation), every
    worker the same graph as rank 0; the reference is one process's eager engine."""
    base, nudger = tiny_pair("llama", "llama", agreement=0.5)
    # Fixed drafting: the round plan follows measured timings, which would move where the abort cuts.
    kw = dict(num_blocks=10, max_num_batched_tokens=48, attention_backend="torch", adaptive_drafting=False,
              max_num_seqs=8)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    prompts = [[3 + i, 17, 40 + 2 * i, 9, 11 + i, 5] * (1 + i % 3) for i in range(6)]
    single = NudgeEngine(base, nudger, enforce_eager=True, **kw)
    check_pools(single)
    want = single.generate(prompts, params)
    want_aborted = _run_with_abort(single, prompts, params)
    sharded = NudgeEngine(base, nudger, tensor_parallel_size=2, nudger_placement=placement, enforce_eager=not graphs,
                          **kw)
    procs = list(sharded._tp.procs)
    try:
        check_pools(sharded)
        got = sharded.generate(prompts, params)
        assert single.stats.preemptions > 0 and sharded.stats.preemptions > 0
        assert [(o.token_ids, o.sources) for o in got] == [(o.token_ids, o.sources) for o in want]
        assert any(s == "nudger" for o in got for s in o.sources) and any(s == "base" for o in got for s in o.sources)
        assert _run_with_abort(sharded, prompts, params) == want_aborted
        if graphs:   # the sharded base's verify passes and the nudger's drafts were replays, some padded
            replays = sharded.base.graphs.replays
            assert any(q > 1 for _, q in replays) and len(replays) > 2, replays
            assert sum(sharded.nudger.graphs.replays.values()) > 0
        else:
            assert sharded.base.graphs is None
    finally:
        sharded.close()
    assert procs and not any(p.is_alive() for p in procs)


def test_several_tensor_parallel_engines_in_one_process(tiny_model):
    """Each engine owns its group (its own store and workers): two at once, stepped in turn, give one
    process's tokens each; closing one leaves the other working; a third opens after both closed."""
    folders = (tiny_model("llama"), tiny_model("qwen2"))
    kw = dict(num_blocks=16, attention_backend="torch", max_num_seqs=4)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    prompts = [[5, 6, 7, 8], [40, 3, 9]]
    want = [[o.token_ids for o in NudgeEngine(f, enforce_eager=True, **kw).generate(prompts, params)] for f in folders]
    assert want[0] != want[1]   # cross-talk between the engines would show
    first, second = (NudgeEngine(f, tensor_parallel_size=2, enforce_eager=graphs, **kw)
                     for f, graphs in zip(folders, (True, False)))
    procs = first._tp.procs + second._tp.procs
    try:
        ids = [[e.add_request(p, params) for p in prompts] for e in (first, second)]
        reqs = [[e.requests[i] for i in rid] for e, rid in zip((first, second), ids)]
        while first.has_unfinished() or second.has_unfinished():   # the two groups' passes interleave
            first.step()
            second.step()
        assert [[r.result().token_ids for r in rs] for rs in reqs] == want
        first.close()
        assert not any(p.is_alive() for p in first._tp.procs)
        assert [o.token_ids for o in second.generate(prompts, params)] == want[1]
    finally:
        first.close()
        second.close()
    third = NudgeEngine(folders[0], tensor_parallel_size=2, enforce_eager=False, **kw)
    procs += third._tp.procs
    try:
        assert [o.token_ids for o in third.generate(prompts, params)] == want[0]
    finally:
        third.close()
    assert len(procs) == 3 and not any(p.is_alive() for p in procs)


def test_a_worker_killed_mid_step_ends_the_engine_and_leaves_no_process(tiny_model, monkeypatch):
    monkeypatch.setenv("NUDGE_TP_TIMEOUT_S", str(DEAD_ENGINE_TIMEOUT_S))
    engine = NudgeEngine(tiny_model("llama"), tensor_parallel_size=2, num_blocks=16, attention_backend="torch")
    (worker,) = engine._tp.procs
    try:
        params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
        assert len(engine.generate([[5, 6, 7]], params)[0].token_ids) == 8   # the group works before the kill
        runner = engine.base.runner
        inner_forward = runner.inner.forward

        def killed_after_broadcast(step, rows):   # the worker got this pass's inputs, then dies
            os.kill(worker.pid, signal.SIGKILL)
            worker.join(DEAD_ENGINE_TIMEOUT_S)
            return inner_forward(step, rows)

        runner.inner.forward = killed_after_broadcast
        front = AsyncNudgeEngine(engine)

        async def main():
            try:
                with pytest.raises((EngineStepError, EngineDeadError)) as info:
                    await asyncio.wait_for(front.generate([1, 2, 3], params), DEAD_ENGINE_TIMEOUT_S + 5)
                # The request's error tells the truth: the server does not go on serving (issue 28).
                assert "goes on serving" not in str(info.value) and "restart" in str(info.value), info.value
                for _ in range(100):   # the engine thread stops: the server's /health answers 503
                    if not front.health()["alive"]:
                        break
                    await asyncio.sleep(0.05)
                return front.health()
            finally:
                front.shutdown()

        health = asyncio.run(main())
        assert not health["alive"] and "WorkerDiedError" in health["dead_reason"], health
        engine.add_request([1, 2, 3], params)
        with pytest.raises(WorkerDiedError, match="died"):   # the next pass fails at once, before any collective
            engine.step()
        for rid in list(engine.requests):
            engine.abort(rid)
    finally:
        engine.close()
    assert not worker.is_alive() and worker.exitcode == -signal.SIGKILL


def _cli(*args: str, launcher: tuple[str, ...] = ()) -> str:
    cmd = [sys.executable, *launcher, "-m", "nudge_engine", "generate", *args, "--color", "never"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "NUDGE_TP_TIMEOUT_S": "60"})
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_cli_generate_with_tensor_parallel_under_torchrun(tiny_pair):
    base, nudger = tiny_pair("llama", "llama", agreement=0.5)
    args = ("--base", str(base), "--nudger", str(nudger), "--prompt", "hello there", "--max-tokens", "12",
            "--num-blocks", "32")
    want = _cli(*args).splitlines()[0]     # the marked text: which words the nudger wrote, too
    torchrun = ("-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", free_tcp_address().rsplit(":", 1)[1])
    got = _cli(*args, "--tensor-parallel-size", "2", launcher=torchrun)
    assert got.splitlines().count(want) == 1   # one engine (rank 0); rank 1 ran the worker loop
    assert "[[" in want   # the nudger wrote some of it: the sources are compared too


def test_sizes_that_do_not_divide_the_model_are_refused_before_any_process_starts(tiny_model):
    folder = tiny_model("llama")   # 4 heads, 2 KV heads, intermediate 128
    with pytest.raises(ValueError, match="does not divide its attention heads"):
        NudgeEngine(folder, tensor_parallel_size=3)
    with pytest.raises(ValueError, match="at least 1"):
        NudgeEngine(folder, tensor_parallel_size=0)
    with pytest.raises(ValueError, match="nudger_placement"):
        NudgeEngine(folder, tensor_parallel_size=2, nudger_placement="everywhere")
    assert not mp.active_children()


def test_a_script_without_the_main_guard_builds_a_tensor_parallel_engine(tiny_model, tmp_path):
    """Workers are fresh interpreters that do not re-run the user's script (distributed/worker.py), so
    an engine built at module level, with no `if __name__ == "__main__":`, works as it would in one
    process, instead of failing in multiprocessing's bootstrapping phase."""
    folder = tiny_model("llama")
    kw = dict(num_blocks=16, attention_backend="torch", max_num_seqs=4)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    want = NudgeEngine(folder, enforce_eager=True, **kw).generate([[5, 6, 7, 8]], params)[0].token_ids
    script = tmp_path / "no_guard.py"
    script.write_text(
        "from nudge_engine import NudgeEngine, SamplingParams\n"
        f"engine = NudgeEngine({str(folder)!r}, tensor_parallel_size=2, enforce_eager=True, **{kw!r})\n"
        "out = engine.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))\n"
        "print('TOKENS', out[0].token_ids)\n"
        "print('WORKERS', *[p.pid for p in engine._tp.procs])\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180, cwd=tmp_path,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "NUDGE_TP_TIMEOUT_S": "60"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "bootstrapping" not in out.stderr
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if line.startswith(("TOKENS", "WORKERS")))
    assert lines["TOKENS"] == str(want)
    for pid in lines["WORKERS"].split():   # the workers ended with the script
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
