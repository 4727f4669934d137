"""Counts the kernels one decode step launches, per decoder layer and in total, for every family.

Runs on the CPU with the Triton backend interpreted (TRITON_INTERPRET=1), on the tiny test
models (2 layers, bfloat16 by default), one decode token after a 40-token prefill (long enough that flash-decoding
splits the context, so attention is its decode kernel plus the combine kernel, as on a GPU).

What counts as a kernel:
  - every Triton launch (each one is wrapped in a `triton::<kernel>` profiler range; the aten ops
    the interpreter runs inside it to stage arguments are not counted);
  - every leaf aten op in the torch profiler's trace (an op with no aten op under it) that does
    arithmetic or copies data. Views, allocations and shape queries are not kernels.
On a GPU, torch may fuse some composite ops that the CPU runs as several leaves (F.rms_norm is one
kernel on CUDA): the torch backend's counts here are an upper bound; Triton launches count exactly.
Per layer = the ops inside the last decoder layer's forward: a layer also does the previous
layer's residual add (fused into its first norm), so the first layer can be one kernel short
(OLMo-2's has no norm before attention), and Gemma-2's last layer is a full-attention one.
Per step = everything in ModelRunner.forward: plan, embeddings, layers, final norm, LM head.

    python -m benchmarks.launch_count [--backend triton|torch] [--verbose] [--out FILE.md]
Prints one line per family: `<family>: N kernels per layer, M per step`.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

import nudge_engine  # noqa: E402
from nudge_engine.testing import FAMILIES, make_tiny_model  # noqa: E402

# Ops that launch nothing on a GPU: views, allocations, metadata.
NOT_KERNELS = frozenset("aten::" + name for name in (
    "empty empty_strided empty_like view _unsafe_view reshape _reshape_alias as_strided t transpose "
    "permute expand expand_as squeeze unsqueeze slice select split split_with_sizes chunk narrow unbind "
    "detach detach_ alias lift_fresh resize_ set_ result_type size stride is_nonzero numpy_T "
    "_local_scalar_dense item scalar_tensor resolve_conj resolve_neg conj "
    "to _to_copy type_as contiguous clone"  # no-ops when nothing changes; when they copy, their copy_ counts
).split())
# One kernel each, whatever the CPU runs under them (addmm copies the bias in first on the CPU).
ATOMIC = frozenset({"aten::addmm", "aten::mm", "aten::bmm", "aten::native_layer_norm"})
TRITON_RANGE = "triton::"
LAYER_RANGE = "nudge::layer"
PREFILL = 40


def _install_triton_ranges() -> None:
    """Wrap every interpreted Triton launch in a profiler range named after its kernel."""
    from triton.runtime.interpreter import InterpretedFunction

    run = InterpretedFunction.run
    if getattr(run, "_counted", False):
        return

    def counted_run(self, *args, **kwargs):
        with record_function(TRITON_RANGE + self.fn.__name__):
            return run(self, *args, **kwargs)

    counted_run._counted = True
    InterpretedFunction.run = counted_run


def _wrap_layer(layer: torch.nn.Module, index: int) -> None:
    forward = layer.forward

    def ranged(*args, **kwargs):
        with record_function(f"{LAYER_RANGE}{index}"):
            return forward(*args, **kwargs)

    layer.forward = ranged


def _is_op(ev) -> bool:
    return ev.name.startswith(TRITON_RANGE) or (ev.name.startswith("aten::") and ev.name not in NOT_KERNELS)


def _has_op_below(ev) -> bool:
    return any(_is_op(c) or _has_op_below(c) for c in ev.cpu_children)


def _kernels(events) -> list[tuple[str, str | None]]:
    """(kernel name, layer range or None) for every kernel in the trace: Triton launches and the
    lowest aten ops that compute (a composite op such as aten::linear counts as its addmm)."""
    out = []
    for ev in events:
        name = ev.name
        chain, p = [], ev.cpu_parent
        while p is not None:
            chain.append(p.name)
            p = p.cpu_parent
        if any(c.startswith(TRITON_RANGE) or c in ATOMIC for c in chain):
            continue  # inside a counted kernel (the interpreter's own tensor traffic in a launch)
        atomic = name.startswith(TRITON_RANGE) or name in ATOMIC
        if not _is_op(ev) or (not atomic and _has_op_below(ev)):
            continue
        kernel = name
        layer = next((c for c in chain if c.startswith(LAYER_RANGE)), None)
        out.append((kernel, layer))
    return out


def count_family(family: str, backend: str, dtype: str, tmp: str) -> dict:
    folder = make_tiny_model(Path(tmp) / family, family)
    model = nudge_engine.load_model(folder, dtype=dtype, attention_backend=backend, num_blocks=16, block_size=16)
    runner = model.runner
    for i, layer in enumerate(runner.model.model.layers):
        _wrap_layer(layer, i)
    forward = runner.forward
    captured = {}

    def profiled(step, logits_indices):
        if step.max_query_len != 1:
            return forward(step, logits_indices)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            logits = forward(step, logits_indices)
        captured["kernels"] = _kernels(prof.events())
        return logits

    runner.forward = profiled
    model.score([list(range(5, 5 + PREFILL + 1))], prefill=PREFILL, chunk=1)
    kernels = captured["kernels"]
    num_layers = len(runner.model.model.layers)
    last_layer = [k for k, layer in kernels if layer == f"{LAYER_RANGE}{num_layers - 1}"]
    return {"per_layer": len(last_layer), "per_step": len(kernels), "layer_ops": last_layer,
            "num_layers": num_layers, "all": kernels}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="triton", choices=("triton", "torch"))
    ap.add_argument("--dtype", default="bfloat16", help="model dtype (bfloat16: the casts a GPU run makes)")
    ap.add_argument("--families", nargs="*", default=list(FAMILIES))
    ap.add_argument("--verbose", action="store_true", help="list the last layer's kernels")
    ap.add_argument("--out", help="also write the lines as a markdown table to this file")
    args = ap.parse_args()
    if args.backend == "triton":
        import nudge_engine.kernels.utils  # noqa: F401  (interpreter set-up before triton decorates)
        _install_triton_ranges()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            r = count_family(family, args.backend, args.dtype, tmp)
            rows.append((family, r))
            print(f"{family}: {r['per_layer']} kernels per layer, {r['per_step']} per step")
            if args.verbose:
                for name, n in collections.Counter(r["layer_ops"]).items():
                    print(f"    {n} x {name}")
                outside = collections.Counter(k for k, layer in r["all"] if layer is None)
                print("    outside the layers:", ", ".join(f"{n} x {k}" for k, n in outside.items()))
    if args.out:
        lines = [f"| family | kernels per layer | per step ({rows[0][1]['num_layers']} layers) |", "|---|---:|---:|"]
        lines += [f"| {f} | {r['per_layer']} | {r['per_step']} |" for f, r in rows]
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
