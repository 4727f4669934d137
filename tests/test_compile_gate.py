"""The compile gate can fail: kernels that the interpreter runs but a GPU build rejects are reported.

Two deliberately broken kernels, each run under TRITON_INTERPRET=1 with the launch recorder on
(results checked against torch, so the interpreter really accepts them), then gated:
- an fp8 (e4m3) matmul: sm_80 has no such type, the sm_80 compile fails;
- a 4-stage pipelined 128x128x128 fp16 matmul: 256 KiB of shared memory, above H100's 227 KiB.
"""
import importlib.util
import json
import os
import sys
import textwrap

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels below are decorated
pytest.importorskip("triton")
torch = pytest.importorskip("torch")

from benchmarks import compile_gate  # noqa: E402
from benchmarks.launch_recorder import LaunchRecorder, canonical_int, load  # noqa: E402

BROKEN = textwrap.dedent('''
    import triton
    import triton.language as tl


    @triton.jit
    def fp8_dot_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr):
        rm, rk, rn = tl.arange(0, M), tl.arange(0, K), tl.arange(0, N)
        a = tl.load(a_ptr + rm[:, None] * K + rk[None, :]).to(tl.float8e4nv)
        b = tl.load(b_ptr + rk[:, None] * N + rn[None, :]).to(tl.float8e4nv)
        tl.store(c_ptr + rm[:, None] * N + rn[None, :], tl.dot(a, b))


    @triton.jit
    def pipelined_dot_kernel(a_ptr, b_ptr, c_ptr, K, M: tl.constexpr, N: tl.constexpr,
                             BLOCK_K: tl.constexpr):
        rm, rn = tl.arange(0, M), tl.arange(0, N)
        acc = tl.zeros([M, N], tl.float32)
        for k in range(0, K, BLOCK_K):
            rk = k + tl.arange(0, BLOCK_K)
            a = tl.load(a_ptr + rm[:, None] * K + rk[None, :])
            b = tl.load(b_ptr + rk[:, None] * N + rn[None, :])
            acc = tl.dot(a, b, acc)
        tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc)
''')


@pytest.fixture
def broken(tmp_path):
    path = tmp_path / "broken_gate_kernels.py"
    path.write_text(BROKEN)
    spec = importlib.util.spec_from_file_location("broken_gate_kernels", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["broken_gate_kernels"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("broken_gate_kernels", None)


def _launch(recorder, kernel, m, k, n, **kw):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen).half()
    b = torch.randn(k, n, generator=gen).half()
    c = torch.empty(m, n)
    with recorder:
        kernel[(1,)](a, b, c, *kw.pop("runtime", ()), **kw)
    return a, b, c


def test_recorder_keeps_what_specializes(broken):
    rec = LaunchRecorder(tag="unit")
    a, b, c = _launch(rec, broken.pipelined_dot_kernel, 32, 64, 32, runtime=(64,), M=32, N=32, BLOCK_K=16,
                      num_warps=2)
    torch.testing.assert_close(c, a.float() @ b.float(), atol=1e-2, rtol=1e-2)
    (entry,) = rec.records.values()
    assert entry["name"] == "pipelined_dot_kernel" and entry["tags"] == ["unit"]
    assert entry["args"][0] == {"tensor": "torch.float16", "align": a.data_ptr() % 16}
    assert entry["args"][3] == {"value": 16}                       # K = 64: "divisible by 16" kept
    assert entry["args"][4:] == [{"value": 32}, {"value": 32}, {"value": 16}]  # constexprs exact
    assert entry["options"] == {"num_warps": 2}
    assert [canonical_int(v) for v in (1, 17, 48, 2**40)] == [1, 3, 16, 2**36]


def test_gate_reports_compile_error_and_shared_memory(broken, tmp_path):
    records = tmp_path / "launches.jsonl"
    rec80 = LaunchRecorder(tag="tests", target="sm80")
    a, b, c = _launch(rec80, broken.fp8_dot_kernel, 16, 32, 16, M=16, K=32, N=16)
    assert torch.isfinite(c).all()  # the interpreter runs it
    rec80.save(records)
    rec90 = LaunchRecorder(tag="tests", target="sm90")
    a, b, c = _launch(rec90, broken.pipelined_dot_kernel, 128, 256, 128, runtime=(256,), M=128, N=128,
                      BLOCK_K=128, num_warps=8, num_stages=4)
    torch.testing.assert_close(c, a.float() @ b.float(), atol=5e-2, rtol=1e-2)
    rec90.save(records)
    assert len(load(records)) == 2

    rc = compile_gate.main(["--records", str(records), "--tritons", "local", "--jobs", "1",
                            "--results-dir", str(tmp_path)])
    assert rc == 1
    (table,) = tmp_path.glob("compile_gate_triton-*.json")
    problems = json.loads(table.read_text())["problems"]
    assert any("compile error" in p and "fp8_dot_kernel sm_80" in p for p in problems), problems
    assert any(p.startswith("shared memory") and "pipelined_dot_kernel sm_90" in p for p in problems), problems
    assert len(problems) == 2


def test_spills_fail_only_at_production_shapes():
    base = dict(module="m", name="k", arch=90, regs=255, shared=0, stack=0, local=64, options={})
    assert compile_gate.check(dict(base, tags=["tests"])) == []
    assert "register spills" in compile_gate.check(dict(base, tags=["production"]))[0]
    assert "shared memory" in compile_gate.check(dict(base, local=0, shared=300 * 1024, tags=["tests"]))[0]
