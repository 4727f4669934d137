"""Compile gate: every recorded Triton kernel specialization compiled for sm_80 and sm_90, no GPU.

The interpreter accepts programs a GPU compile rejects and hides registers, shared memory and
spills. This gate compiles what the kernel tests launched (benchmarks/launch_recorder.py) and
what production-shaped launches would launch (benchmarks/compile_gate_shapes.py) the way
JITFunction.run does (Triton's own binder, specialization and options), for each target GPU, and
reads registers / spills of the cubin with the cuobjdump of the Triton wheel. It fails on:

- a compile error (any record);
- shared memory above the target's per-block limit (any record);
- local memory (register spills) in a production-shape record.

It runs under the local Triton and under the GPU image's Triton (3.6.0, installed on demand into
a cached environment: gate_env.py), each in its own process with the interpreter off, and writes
one table per Triton version to benchmarks/results/compile_gate_triton-<version>.{md,json}.

    python -m benchmarks.compile_gate                  # record (kernel tests + shapes), gate, tables
    python -m benchmarks.compile_gate --records a.jsonl --records b.jsonl   # gate given records
    python -m benchmarks.compile_gate --tritons local  # only the local Triton
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
KERNEL_TESTS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_kernel_*.py"))
DEVICE_IMAGE_TRITON = "3.6.0"

# Per target: shared memory a block may take / an SM has, in bytes (CUDA programming guide,
# compute capabilities 8.0 and 9.0), and the SM's register file and limits.
TARGETS = {
    80: dict(name="sm_80 (A100)", smem_block=163 * 1024, smem_sm=164 * 1024),
    90: dict(name="sm_90 (H100)", smem_block=227 * 1024, smem_sm=228 * 1024),
}
REGS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
REG_ALLOC_UNIT = 256       # registers are given to a warp in chunks of 256
SMEM_RESERVED_PER_BLOCK = 1024
REGS_TARGET = 128          # the register budget the attention kernels are tuned to (the bar)


def occupancy(regs: int, smem: int, num_warps: int, arch: int) -> float:
    """Fraction of the SM's warp slots the kernel can fill (registers, shared memory, block cap)."""
    regs_per_warp = -(-max(regs, 1) * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    by_regs = REGS_PER_SM // (regs_per_warp * num_warps)
    by_smem = TARGETS[arch]["smem_sm"] // (smem + SMEM_RESERVED_PER_BLOCK) if smem else MAX_BLOCKS_PER_SM
    by_warps = MAX_WARPS_PER_SM // num_warps
    blocks = min(by_regs, by_smem, by_warps, MAX_BLOCKS_PER_SM)
    return blocks * num_warps / MAX_WARPS_PER_SM


# ---- one process, one Triton: compile records ----------------------------------------------------

class _Dtype:
    def __init__(self, name: str):
        self.name = name

    def __str__(self):
        return self.name


_DTYPES: dict[str, object] = {}


def _dtype(name: str):
    """torch's dtype object where torch is importable, else a stand-in with the same str(). One
    object per name, kept alive: Triton's specializer caches by dtype object identity."""
    if name not in _DTYPES:
        try:
            import torch

            _DTYPES[name] = getattr(torch, name.removeprefix("torch."))
        except (ImportError, AttributeError):
            _DTYPES[name] = _Dtype(name)
    return _DTYPES[name]


class _Tensor:
    """What Triton's specializer reads of a tensor argument: its dtype and pointer alignment."""

    def __init__(self, dtype: str, align: int):
        self.dtype = _dtype(dtype)
        self._ptr = (1 << 20) + align

    def data_ptr(self) -> int:
        return self._ptr


def _decode(arg):
    if "tensor" in arg:
        return _Tensor(arg["tensor"], arg["align"])
    if "value" in arg:
        return arg["value"]
    raise ValueError(f"cannot rebuild argument {arg['unsupported']}")


def _kernel(record):
    import importlib
    import importlib.util

    try:
        module = importlib.import_module(record["module"])
    except ImportError:
        spec = importlib.util.spec_from_file_location(record["module"], record["file"])
        module = importlib.util.module_from_spec(spec)
        sys.modules[record["module"]] = module
        spec.loader.exec_module(module)
    obj = module
    for part in record["name"].split("."):
        obj = getattr(obj, part)
    return obj


def _resources(cubin: bytes) -> dict:
    """REG / STACK / LOCAL of the cubin's kernel, read by the wheel's cuobjdump."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", f.name], check=True,
                              capture_output=True, text=True).stdout
    for line in text.splitlines():
        if "REG:" in line:
            fields = dict(tok.split(":", 1) for tok in line.split() if ":" in tok)
            return {"regs": int(fields["REG"]), "stack": int(fields["STACK"]), "local": int(fields["LOCAL"])}
    raise RuntimeError(f"no resource line in cuobjdump output:\n{text}")


def compile_record(record: dict, arch: int) -> dict:
    """Compile one record for one target as JITFunction.run would; resource usage or the error."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    out = {"module": record["module"], "name": record["name"], "arch": arch, "tags": record["tags"],
           "options": record["options"]}
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    try:
        kernel = _kernel(record)
        target = GPUTarget("cuda", arch, 32)
        backend = make_backend(target)
        args = [_decode(a) for a in record["args"]]
        kwargs = dict(record["options"])
        kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
        for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):  # as run() sets them
            if hasattr(knobs.compilation, name):
                kwargs[name] = getattr(knobs.compilation, name)
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
        out.update(_resources(compiled.asm["cubin"]))
        out["shared"] = int(compiled.metadata.shared)
        out["num_warps"] = int(compiled.metadata.num_warps)
        out["occupancy"] = occupancy(out["regs"], out["shared"], out["num_warps"], arch)
        out["constexprs"] = {kernel.arg_names[path[0]]: v for path, v in constexprs.items() if len(path) == 1}
    except Exception as e:  # noqa: BLE001  (the gate reports every failure, it must not stop at one)
        out["error"] = f"{type(e).__name__}: {str(e).strip()[:2000]}"
    out["seconds"] = round(time.perf_counter() - t0, 3)
    out["cpu_seconds"] = round(_cpu_seconds() - cpu0, 3)  # this process + ptxas / cuobjdump children
    return out


def _cpu_seconds() -> float:
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _compile_one(job):
    return compile_record(*job)


def compile_all(records: list[dict], archs: list[int], jobs: int) -> list[dict]:
    work = [(r, a) for r in records for a in archs if r.get("target") in (None, f"sm{a}")]
    if jobs <= 1:
        return [_compile_one(w) for w in work]
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        return pool.map(_compile_one, work, chunksize=1)


def check(result: dict) -> list[str]:
    """The gate's verdict on one compile: an empty list, or what is wrong."""
    where = f"{result['module']}.{result['name']} sm_{result['arch']} {result.get('constexprs', '')}"
    if "error" in result:
        return [f"compile error: {where}: {result['error'].splitlines()[0] if result['error'] else ''}"]
    problems = []
    limit = TARGETS[result["arch"]]["smem_block"]
    if result["shared"] > limit:
        problems.append(f"shared memory {result['shared']} B > {limit} B: {where}")
    if "production" in result["tags"] and result["local"] > 0:
        problems.append(f"register spills ({result['local']} B local memory) at a production shape: {where}")
    return problems


# ---- the table -------------------------------------------------------------------------------------

def summarize(results: list[dict]) -> list[dict]:
    rows = {}
    for r in results:
        key = (r["name"], r["arch"])
        row = rows.setdefault(key, dict(kernel=r["name"], module=r["module"], arch=r["arch"], specs=0,
                                        production=0, errors=0, max_regs=0, max_regs_production=0,
                                        over_regs_target=0, max_shared=0, spills=0, max_local=0,
                                        min_occupancy=1.0, worst=None))
        row["specs"] += 1
        prod = "production" in r["tags"]
        row["production"] += prod
        if "error" in r:
            row["errors"] += 1
            continue
        row["max_regs"] = max(row["max_regs"], r["regs"])
        if prod:
            row["max_regs_production"] = max(row["max_regs_production"], r["regs"])
            row["over_regs_target"] += r["regs"] > REGS_TARGET
        row["max_shared"] = max(row["max_shared"], r["shared"])
        row["spills"] += r["local"] > 0
        row["max_local"] = max(row["max_local"], r["local"])
        if prod and r["occupancy"] < row["min_occupancy"]:
            row["min_occupancy"] = r["occupancy"]
            row["worst"] = {"constexprs": r["constexprs"], "options": r["options"], "regs": r["regs"]}
    return sorted(rows.values(), key=lambda row: (row["arch"], row["module"], row["kernel"]))


def write_table(path: Path, results: list[dict], meta: dict, problems: list[str]) -> None:
    rows = summarize(results)
    lines = [
        f"# Compile gate: Triton {meta['triton']}", "",
        f"{meta['date']}, commit {meta['commit']}, {meta['compiles']} compiles in {meta['seconds']:.0f} s wall, "
        f"{meta['cpu_seconds']:.0f} CPU-s on {meta['jobs']} jobs (`python -m benchmarks.compile_gate`; "
        f"kernels found in Triton's on-disk cache are not compiled again, so a cold run takes longer). Specializations: every distinct launch of the kernel tests "
        f"(interpreter launch plans) and of benchmarks/compile_gate_shapes.py (production shapes, GPU launch "
        f"plans); each compiled for its target with the launch's own num_warps / num_stages. Registers and "
        f"local (spill) memory from cuobjdump --dump-resource-usage, shared memory from the compiled "
        f"kernel's metadata; occupancy = warps resident per SM / 64 at the worst production specialization.",
        "",
        "| target | kernel | specs (production) | errors | max regs | max regs, production | "
        f"production > {REGS_TARGET} regs | max shared (B) | specs with spills | min occupancy, production |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        occ = f"{row['min_occupancy']:.0%}" if row["production"] else "-"
        lines.append(
            f"| sm_{row['arch']} | {row['kernel']} | {row['specs']} ({row['production']}) | {row['errors']} | "
            f"{row['max_regs']} | {row['max_regs_production'] if row['production'] else '-'} | "
            f"{row['over_regs_target'] if row['production'] else '-'} | {row['max_shared']} | "
            f"{row['spills']} | {occ} |")
    lines += ["", "## Verdict", ""]
    lines += [f"- {p}" for p in problems] if problems else ["PASS: no compile error, shared memory within the "
                                                             "per-block limit, no spills at production shapes."]
    path.write_text("\n".join(lines) + "\n")
    path.with_suffix(".json").write_text(json.dumps(
        {"meta": meta, "summary": rows, "problems": problems, "results": results}, indent=1, sort_keys=True))


# ---- driver ----------------------------------------------------------------------------------------

def record_launches(path: Path, log) -> None:
    """Kernel tests under the interpreter with the recorder on, then the production shapes."""
    env = dict(os.environ, TRITON_INTERPRET="1", NUDGE_RECORD_LAUNCHES=str(path))
    env.pop("NUDGE_TEST_DEVICE", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "benchmarks.launch_recorder", "-p", "no:cacheprovider",
           *KERNEL_TESTS]
    log(f"recording the kernel tests' launches: {' '.join(cmd[2:])}")
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    subprocess.run([sys.executable, "-m", "benchmarks.compile_gate_shapes", str(path)], cwd=ROOT, check=True,
                   env=dict(os.environ, TRITON_INTERPRET="0"))


def run_gate_process(python: list[str], extra_path: str | None, records: list[Path], archs: list[int],
                     jobs: int, out: Path) -> dict:
    """This module's --compile-only in a fresh process (interpreter off) under a given Triton."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (extra_path, str(ROOT), os.environ.get("PYTHONPATH")) if p)
    cmd = [*python, "-m", "benchmarks.compile_gate", "--compile-only", "--out", str(out),
           "--jobs", str(jobs), "--arch", *map(str, archs)]
    for r in records:
        cmd += ["--records", str(r)]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    return json.loads(out.read_text())


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "nogit"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", action="append", type=Path, help="launch records (.jsonl); default: record now")
    ap.add_argument("--arch", type=int, nargs="+", default=sorted(TARGETS), choices=sorted(TARGETS))
    ap.add_argument("--tritons", nargs="+", default=["local", DEVICE_IMAGE_TRITON],
                    help="'local' and/or Triton versions to install into a cached environment")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--results-dir", type=Path, default=RESULTS)
    ap.add_argument("--compile-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    log = lambda msg: print(f"[compile gate] {msg}", flush=True)  # noqa: E731

    if args.compile_only:  # the worker: this process's Triton, interpreter off
        os.environ["TRITON_INTERPRET"] = "0"
        import triton

        from benchmarks.launch_recorder import load

        records = [r for path in args.records for r in load(path)]
        # Two record files can hold the same launch: merge again across files.
        merged = {}
        for r in records:
            key = json.dumps({k: r[k] for k in ("module", "name", "args", "options", "target")}, sort_keys=True)
            if key in merged:
                merged[key]["tags"] = sorted(set(merged[key]["tags"]) | set(r["tags"]))
            else:
                merged[key] = r
        t0 = time.perf_counter()
        results = compile_all(list(merged.values()), args.arch, args.jobs)
        args.out.write_text(json.dumps({"triton": triton.__version__, "seconds": time.perf_counter() - t0,
                                        "results": results}))
        return 0

    from benchmarks.gate_env import triton_env

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="compile-gate-") as tmp:
        records = args.records
        if not records:
            records = [Path(tmp) / "launches.jsonl"]
            try:
                record_launches(records[0], log)
            except subprocess.CalledProcessError as e:
                log(f"FAILED while recording launches: {' '.join(map(str, e.cmd[:6]))}... exit {e.returncode}")
                return 1
        failed = False
        for version in args.tritons:
            python, extra_path = [sys.executable], None
            if version != "local":
                try:
                    extra_path = str(triton_env(version, log))
                except subprocess.CalledProcessError as e:
                    log(f"FAILED: could not install triton=={version} into {e.cmd[-2]} (pip exit {e.returncode})")
                    failed = True
                    continue
            out = Path(tmp) / f"results-{version}.json"
            log(f"compiling for {args.arch} under triton {version} ({args.jobs} jobs)")
            got = run_gate_process(python, extra_path, records, args.arch, args.jobs, out)
            results = got["results"]
            problems = [p for r in results for p in check(r)]
            if version != "local" and got["triton"] != version:  # the cached triton did not shadow the venv's
                problems.append(f"asked for triton {version}, the gate process imported {got['triton']}")
            meta = dict(triton=got["triton"], commit=_git_commit(), date=time.strftime("%Y-%m-%d"),
                        compiles=len(results), seconds=got["seconds"], archs=args.arch, jobs=args.jobs,
                        cpu_seconds=sum(r.get("cpu_seconds", 0.0) for r in results))
            args.results_dir.mkdir(parents=True, exist_ok=True)
            table = args.results_dir / f"compile_gate_triton-{got['triton']}.md"
            write_table(table, results, meta, problems)
            log(f"triton {got['triton']}: {len(results)} compiles in {got['seconds']:.0f} s -> {table}")
            print(table.read_text())
            failed |= bool(problems)
    log(f"{'FAILED' if failed else 'passed'} in {time.perf_counter() - start:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
