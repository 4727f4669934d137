"""The fused per-layer kernels compile for a CUDA target (sm_90) without a GPU, with no register
spills. Compiling is real Triton codegen + ptxas, so it runs in a subprocess with the interpreter
off (this process's kernels may be interpreted).

    TRITON_INTERPRET=0 python tests/test_kernel_compile_sm90.py   # prints registers / spills per kernel
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TARGET = ("cuda", 90, 32)

ADD_NORM_ARGS = {
    "x_ptr": "*bf16", "res_ptr": "*bf16", "rows_ptr": "*i64", "post_w_ptr": "*bf16", "pre_w_ptr": "*bf16",
    "out_ptr": "*bf16", "res_out_ptr": "*bf16", "hidden": "i32", "stride_x": "i32", "stride_r": "i32",
    "stride_o": "i32", "stride_ro": "i32", "post_eps": "fp32", "pre_eps": "fp32",
}
# kernel module, kernel, pointer dtypes / scalar types by argument, constexprs, num_warps: the
# heaviest variant of each (bfloat16, Llama-3-8B / OLMo-2-7B widths, every optional step on), and
# add_norm's other norm kinds (RMS, layer norm) at a 8192-wide row.
CASES = [
    ("add_norm", "_add_norm_kernel", ADD_NORM_ARGS,
     {"POST": 2, "PRE": 2, "HAS_RESIDUAL": True, "HAS_ROWS": True, "BLOCK": 4096}, 8),
    ("add_norm", "_add_norm_kernel", ADD_NORM_ARGS,
     {"POST": 1, "PRE": 3, "HAS_RESIDUAL": True, "HAS_ROWS": False, "BLOCK": 8192}, 16),
    ("act_and_mul", "_act_and_mul_kernel",
     {"gate_up_ptr": "*bf16", "out_ptr": "*bf16", "inter": "i32", "stride_in": "i32", "stride_out": "i32"},
     {"ACT": 1, "BLOCK": 1024}, 4),
    ("rotary_store", "_rotary_store_kernel",
     {"qkv_ptr": "*bf16", "positions_ptr": "*i64", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "q_norm_w_ptr": "*bf16",
      "k_norm_w_ptr": "*bf16", "q_out_ptr": "*bf16", "k_cache_ptr": "*bf16", "v_cache_ptr": "*bf16",
      "slot_mapping_ptr": "*i64", "num_heads": "i32", "num_kv_heads": "i32", "head_dim": "i32", "block_size": "i32",
      "stride_qkv": "i32", "stride_cos": "i32", "stride_qt": "i32", "stride_qh": "i32",
      "stride_kcb": "i32", "stride_kcs": "i32", "stride_kch": "i32", "stride_vcb": "i32", "stride_vcs": "i32",
      "stride_vch": "i32", "clip": "fp32", "eps": "fp32"},
     {"CLIP": True, "QK_NORM": True, "BLOCK_H": 32, "BLOCK_KH": 8, "BLOCK_HALF": 64}, 4),
]


def compile_all() -> list[tuple[str, int, int]]:
    """Compile every case; -> (kernel, registers, spilled bytes) from the cubin's resource usage."""
    import importlib
    import re
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    results = []
    for module, name, signature, constexprs, num_warps in CASES:
        fn = getattr(importlib.import_module(f"nudge_engine.kernels.{module}"), name)
        sig = dict(signature, **{k: "constexpr" for k in constexprs})
        compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs),
                                  target=GPUTarget(*TARGET), options={"num_warps": num_warps})
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name], check=True,
                                   capture_output=True, text=True).stdout
        regs = int(re.search(r"REG:(\d+)", usage).group(1))
        local = int(re.search(r"LOCAL:(\d+)", usage).group(1))
        results.append((name, regs, local))
    return results


def test_fused_kernels_compile_for_sm90_without_spills():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, __file__], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if "regs" in line]
    assert len(lines) == len(CASES), proc.stdout
    assert all(line.endswith("spilled 0 bytes") for line in lines), proc.stdout


if __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "0"
    sys.path.insert(0, str(ROOT))
    for kernel, regs, local in compile_all():
        print(f"{kernel}: sm_{TARGET[1]}, {regs} regs, spilled {local} bytes")
