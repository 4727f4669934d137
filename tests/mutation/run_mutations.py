"""Mutation check: plant known bugs one at a time in a copy of the package and run the tests that
are meant to catch each one. Every mutation must be caught (its tests fail); a survivor means a
test claims more than it checks.

    .venv/bin/python tests/mutation/run_mutations.py            # all, writes benchmarks/results/
    .venv/bin/python tests/mutation/run_mutations.py -k walk     # the mutations whose name has "walk"

Each mutation names a file, an exact text that must occur once in it, its replacement, and the
tests (pytest node ids or -k expressions) that must catch it. The copy is a temporary directory
holding nudge_engine/ (with the built C++ core), kernels/ as nudge_engine/kernels, tests/ and
pyproject.toml; PYTHONPATH puts it ahead of the editable install. The named tests first run
unmutated in the copy and must pass, so "caught" never means "broken anyway".
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 600


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str                  # path in the repository (kernels/... or nudge_engine/...)
    old: str
    new: str
    tests: tuple[str, ...]     # pytest arguments: node ids, "file::test" or "file -k expr"


S = "tests/test_nudging_sampling.py::"
N = "tests/test_nudging.py::"
K = "tests/test_kernel_handoff.py::"
X = "tests/test_cross_tokenizer.py::"
M = "tests/test_models.py"
TP = "tests/test_tensor_parallel.py::test_sharded_logits_match_one_process_for_every_family"

MUTATIONS = [
    # ---- rejection sampling and the sampling walk (nudge_engine/pairing/sampling_walk.py)
    Mutation("sampling: acceptance ratio inverted, min(1, q/p)", "nudge_engine/pairing/sampling_walk.py",
             "min(1.0, p / q)", "min(1.0, q / p)",
             (S + "test_two_token_distribution_matches_sequential",)),
    Mutation("sampling: a rejected draft emits a sample of p', not of the residual", "nudge_engine/pairing/sampling_walk.py",
             "residual = (base_probs[i] - draft_probs[i]).clamp_min(0.0)", "residual = base_probs[i]",
             (S + "test_two_token_distribution_matches_sequential",)),
    Mutation("sampling: top-1 == gamma nudges (<= for <)", "nudge_engine/pairing/sampling_walk.py",
             "if top1 < gamma:", "if top1 <= gamma:",
             (S + "test_engine_sampling_top1_exactly_gamma_stays_with_the_base",
              S + "test_sampling_walk_top1_exactly_gamma_keeps_or_gives_back_to_the_base")),
    Mutation("sampling: resume needs top-1 > gamma (> for >=)", "nudge_engine/pairing/sampling_walk.py",
             "resume = top1 >= gamma or", "resume = top1 > gamma or",
             (S + "test_sampling_walk_top1_exactly_gamma_keeps_or_gives_back_to_the_base",)),
    Mutation("sampling: the handback keeps the nudger's draft instead of a fresh base sample",
             "nudge_engine/pairing/sampling_walk.py", "if fresh == d:", "if True:",
             (S + "test_two_token_distribution_matches_sequential",)),
    Mutation("sampling: top-k keeps one token too many", "nudge_engine/engine/sampler.py",
             "keep = torch.arange(vocab, device=dev)[None, :] < top_k[:, None]",
             "keep = torch.arange(vocab, device=dev)[None, :] <= top_k[:, None]",
             (S + "test_two_token_distribution_matches_sequential",)),
    # ---- logprobs
    Mutation("logprobs of nudger tokens taken from the base model's rows", "nudge_engine/pairing/walk_logprobs.py",
             "value = nudger_draft[pos]", "value = base_draft[pos]",
             (N + "test_logprobs_of_both_models_tokens_equal_transformers_on_the_writers_context",)),
    Mutation("sampled walk's logprobs of nudger tokens taken from the base model's rows",
             "nudge_engine/pairing/walk_logprobs.py",
             "lp = nudger[pos] if src == Source.NUDGER else base[pos]", "lp = base[pos]",
             (N + "test_logprobs_of_both_models_tokens_equal_transformers_on_the_writers_context",)),
    # ---- greedy handoff rules (nudge_engine/pairing/handoff_torch.py: the reference walk. The CPU engine walks in
    # csrc/handoff_walk.cpp, checked against the same plain walk by test_walk_core_matches_python; a C++ mutation
    # needs a rebuild this runner does not do: `<=` for `<` and a hand-back at run 0 were tried by hand, both caught)
    Mutation("greedy walk: top-1 == gamma nudges (<= for <)", "nudge_engine/pairing/handoff_torch.py",
             "nudge_now = t1 < gamma", "nudge_now = t1 <= gamma",
             (K + "test_walk_torch_matches_python",)),
    Mutation("greedy walk: hand back at a word start with run == 0", "nudge_engine/pairing/handoff_torch.py",
             "hand_back = (run > 0) & word_start_d & resume", "hand_back = word_start_d & resume",
             (K + "test_walk_torch_matches_python", N + "test_engine_equals_sequential_for_every_gamma_k_and_rule")),
    Mutation("greedy walk: agreement rule ignored", "nudge_engine/pairing/handoff_torch.py",
             "resume = (t1 >= gamma) | (resume_on_agreement & (a == d))", "resume = t1 >= gamma",
             (K + "test_walk_torch_matches_python", N + "test_engine_equals_sequential_for_every_gamma_k_and_rule")),
    Mutation("greedy walk: no bonus token after all drafts are accepted", "nudge_engine/pairing/handoff_torch.py",
             "emit = (in_base & ~nudge_now & (~has_draft | ~agree))", "emit = (in_base & ~nudge_now & has_draft & ~agree)",
             (K + "test_walk_torch_matches_python", N + "test_engine_equals_sequential_for_every_gamma_k_and_rule")),
    Mutation("greedy walk: top-1 from exp(max - max), not exp(max - lse)", "nudge_engine/pairing/handoff_torch.py",
             "base_top1 = torch.exp(row_max - lse)\n    acc,", "base_top1 = torch.exp(row_max - row_max)\n    acc,",
             (K + "test_handoff_step_torch_equals_softmax_and_the_python_walk",)),
    # ---- word starts
    Mutation("word-start table all True in the engine", "nudge_engine/pairing/token.py",
             "self.word_start[: len(table)] = torch.tensor(table, dtype=torch.bool)", "self.word_start[:] = True",
             (N + "test_engine_equals_sequential_for_every_gamma_k_and_rule", N + "test_word_start_table_follows_section_3")),
    Mutation("word starts: byte-fallback whitespace pieces not counted", "nudge_engine/model/tokenizer.py",
             "or piece in WHITESPACE_BYTE_PIECES", "or False",
             (N + "test_word_start_table_follows_section_3",)),
    # ---- model numerics
    Mutation("RMSNorm epsilon 10x too large", "nudge_engine/layers/norm.py",
             "(x.shape[-1],), eps=self.eps)", "(x.shape[-1],), eps=self.eps * 10)",
             (M + "::test_one_prefill_of_a_ragged_batch",)),
    Mutation("norm epsilon read as 1e-5 whatever the config says", "nudge_engine/model/config.py",
             'norm_eps=number("rms_norm_eps", float) if raw.get("rms_norm_eps") is not None\n'
             '        else number("layer_norm_eps", float, DEFAULT_NORM_EPS),',
             "norm_eps=DEFAULT_NORM_EPS,",
             (M + "::test_one_prefill_of_a_ragged_batch",)),
    Mutation("RoPE: interleaved pairs instead of rotate-half", "nudge_engine/layers/rotary.py",
             "x1, x2 = x.float().chunk(2, dim=-1)", "x1, x2 = x.float()[..., 0::2], x.float()[..., 1::2]",
             (M + "::test_one_prefill_of_a_ragged_batch",)),
    # ---- tensor parallelism
    Mutation("tensor parallel: row-parallel partial sums not all-reduced", "nudge_engine/layers/linear.py",
             "out = self.tp.all_reduce(F.linear(x, self.weight))", "out = F.linear(x, self.weight)",
             (TP + "[2-torch]",)),
    Mutation("tensor parallel: replicated KV head taken from the wrong group", "nudge_engine/layers/attention.py",
             "kv_start, kv_heads = tp.rank * spec.num_kv_heads // tp.size, 1", "kv_start, kv_heads = 0, 1",
             (TP + "[4-torch]",)),
    Mutation("tensor parallel: QK-norm over this rank's slice only", "nudge_engine/layers/attention.py",
             "    tp.all_reduce(squares)\n", "",
             (TP + "[2-torch]",)),
    Mutation("tensor parallel: workers run rank 0's graph passes eagerly", "nudge_engine/distributed/worker.py",
             "        if graph_size == EAGER:\n", "        if True:\n",
             ("tests/test_tensor_parallel.py::test_nudged_generation_matches_one_process_with_preemption_and_aborts"
              "[tensor-True]",)),
    # ---- cross-tokenizer text path
    Mutation("cross: split only before spaces, not every whitespace byte", "nudge_engine/pairing/wordpieces.py",
             "        if data[i] in WHITESPACE:\n            pieces.append", "        if data[i] == 32:\n            pieces.append",
             (X + "test_word_pieces_are_byte_exact_with_no_prefix_space_and_no_specials",)),
    Mutation("cross: agreement reads at most 2 nudger tokens, not 8", "nudge_engine/pairing/text.py",
             "AGREE_LOOKAHEAD = 8", "AGREE_LOOKAHEAD = 2",
             (X + "test_agreement_reads_the_nudgers_next_word_over_up_to_8_tokens",
              X + "test_engine_equals_reference_for_every_gamma_and_k_in_one_mixed_batch")),
    Mutation("cross: the agreement rule never agrees once the word is long enough", "nudge_engine/pairing/text.py",
             "n >= AGREE_LOOKAHEAD or len(word) >= len(ab):\n                return word.startswith(ab)",
             "n >= AGREE_LOOKAHEAD or len(word) >= len(ab):\n                return False",
             (X + "test_engine_equals_reference_for_every_gamma_and_k_in_one_mixed_batch",
              X + "test_drafts_of_an_agreeing_nudger_are_accepted_and_output_stays_exact")),
    Mutation("cross sampling: every nudge run continues one random stream (k changes the text)",
             "nudge_engine/pairing/text_sampling.py", "    req.nudger_gen.manual_seed(", "    (lambda seed: None)(",
             ("tests/test_cross_sampling.py::test_a_seed_fixes_the_text_whatever_the_batch_and_the_drafting",)),
    Mutation("cross sampling: the base writes its raw argmax in BASE mode, not a sample", "nudge_engine/pairing/text.py",
             "t = base_token(req, row, a)", "t = a",
             ("tests/test_cross_sampling.py::test_text_distribution_matches_the_sequential_reference",)),
    Mutation("cross logprobs: written tokens scored at temperature 0.9", "nudge_engine/pairing/text_logprobs.py",
             "lp = torch.log_softmax(row.float().cpu(), dim=-1)", "lp = torch.log_softmax(row.float().cpu() / 0.9, dim=-1)",
             ("tests/test_cross_sampling.py::test_logprobs_are_the_writers_on_its_own_context",)),
    # ---- Triton kernels (interpreted on the CPU)
    Mutation("kernel handoff_walk: top-1 == gamma nudges", "kernels/handoff_walk.py",
             "nudge_now = t1 < gamma ", "nudge_now = t1 <= gamma ",
             (K + "test_walk_kernel_top1_exactly_gamma",)),
    Mutation("kernel handoff_walk: hand back with run == 0", "kernels/handoff_walk.py",
             "hand_back = (run > 0) & ws & resume", "hand_back = ws & resume",
             (K + "test_walk_kernel_matches_python",)),
    Mutation("kernel handoff_step: top-1 = exp2(max - lse)", "kernels/handoff_step.py",
             "t1 = tl.exp(row_max - lse)", "t1 = tl.exp2(row_max - lse)",
             (K + "test_handoff_step_matches_torch",)),
    Mutation("kernel top1_stats: split sums not rescaled to the row max", "kernels/top1_stats.py",
             "split_sum = tl.sum(tl.where(m == float(\"-inf\"), 0.0, s * tl.exp(m - split_max)), axis=0)",
             "split_sum = tl.sum(tl.where(m == float(\"-inf\"), 0.0, s), axis=0)",
             ("tests/test_kernel_top1_stats.py",)),
    Mutation("kernel paged_attention: running denominator not rescaled", "kernels/paged_attention.py",
             "l_i = l_i * alpha + tl.sum(p, axis=1)", "l_i = l_i + tl.sum(p, axis=1)",
             ("tests/test_kernel_paged_attention.py",)),
    Mutation("kernel store_kv: slot offset shifted by one within its block", "kernels/store_kv.py",
             "off = slot % block_size", "off = (slot + 1) % block_size",
             ("tests/test_kernel_store_kv.py",)),
    # ---- fused kernels of the Triton backend (issue 17)
    Mutation("kernel add_norm: Gemma's (1 + w) multiplies by w", "kernels/add_norm.py",
             "y = y * (1.0 + w)", "y = y * w",
             ("tests/test_kernel_add_norm.py::test_add_norm_matches_torch",)),
    Mutation("kernel add_norm: LayerNorm does not subtract the mean", "kernels/add_norm.py",
             "xc = tl.where(mask, x - mean, 0.0)", "xc = tl.where(mask, x, 0.0)",
             ("tests/test_kernel_add_norm.py::test_add_norm_matches_torch",)),
    Mutation("kernel add_norm: final norm ignores the gathered rows", "kernels/add_norm.py",
             "row = tl.load(rows_ptr + pid).to(tl.int64)", "row = pid.to(tl.int64)",
             ("tests/test_kernel_add_norm.py::test_final_norm_of_gathered_rows",)),
    Mutation("kernel act_and_mul: SiLU's sigmoid mirrored for negative gates", "kernels/act_and_mul.py",
             "return x * tl.where(x < 0.0, e, 1.0) / (1.0 + e)", "return x * tl.where(x < 0.0, 1.0, e) / (1.0 + e)",
             ("tests/test_kernel_act_and_mul.py::test_act_and_mul_matches_torch",)),
    Mutation("kernel act_and_mul: GELU-tanh cubic coefficient 10x", "kernels/act_and_mul.py",
             "(g + 0.044715 * g * g * g)", "(g + 0.44715 * g * g * g)",
             ("tests/test_kernel_act_and_mul.py::test_act_and_mul_matches_torch",)),
    Mutation("kernel rotary_store: queries rotated by -theta", "kernels/rotary_store.py",
             "tl.store(q_dst, (q1 * cos - q2 * sin).to(dtype), mask=q_mask)",
             "tl.store(q_dst, (q1 * cos + q2 * sin).to(dtype), mask=q_mask)",
             ("tests/test_kernel_rotary_store.py",)),
    Mutation("kernel rotary_store: QK-norm uses the first half's weights for both halves", "kernels/rotary_store.py",
             "w2 = tl.load(w_ptr + offs + half, mask=mask", "w2 = tl.load(w_ptr + offs, mask=mask",
             ("tests/test_kernel_rotary_store.py::test_rotary_store_matches_torch",)),
    Mutation("kernel rotary_store: K/V slot offset shifted by one within its block", "kernels/rotary_store.py",
             "off = slot % block_size", "off = (slot + 1) % block_size",
             ("tests/test_kernel_rotary_store.py",)),
    Mutation("draft graph: every further pass re-reads the first draft instead of the previous one",
             "nudge_engine/model/draft_graph.py", "ids = self.out[t, :n]", "ids = self.first_ids[:n]",
             ("tests/test_draft_graph.py::test_fused_draft_passes_equal_the_loop_and_eager",)),
]


def make_copy(dest: Path) -> None:
    shutil.copytree(ROOT / "nudge_engine", dest / "nudge_engine",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "tests", dest / "tests", ignore=shutil.ignore_patterns("__pycache__", "mutation"))
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")


def copy_path(dest: Path, repo_path: str) -> Path:
    if repo_path.startswith("kernels/"):
        return dest / "nudge_engine" / repo_path
    return dest / repo_path


def pytest_args(tests: tuple[str, ...]) -> list[str]:
    return [a for t in tests for a in t.split(" ")]


def run_pytest(dest: Path, tests: tuple[str, ...]) -> tuple[int, str, float]:
    env = {**os.environ, "PYTHONPATH": str(dest), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-rf", *pytest_args(tests)]
    started = time.perf_counter()
    try:
        out = subprocess.run(cmd, cwd=dest, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
        rc, text = out.returncode, out.stdout + out.stderr
    except subprocess.TimeoutExpired:
        rc, text = -1, "timeout"
    return rc, text, time.perf_counter() - started


def failed_tests(text: str) -> list[str]:
    return [m.group(1) for m in re.finditer(r"^FAILED (\S+)", text, re.M)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", default="", help="only mutations whose name contains this text")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for the markdown table")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if args.k.lower() in m.name.lower()]
    with tempfile.TemporaryDirectory(prefix="nudge-mutation-") as tmp:
        dest = Path(tmp)
        make_copy(dest)
        check = subprocess.run([sys.executable, "-c", "import nudge_engine, nudge_engine.kernels as k; "
                                "print(nudge_engine.__file__); print(*k.__path__)"],
                               cwd=dest, env={**os.environ, "PYTHONPATH": str(dest)}, capture_output=True, text=True)
        assert check.returncode == 0 and all(line.startswith(tmp) for line in check.stdout.split()), check
        baseline = sorted({t for m in chosen for t in m.tests})
        rc, text, secs = run_pytest(dest, tuple(baseline))
        print(f"baseline: {len(baseline)} test selections, rc {rc}, {secs:.0f} s", flush=True)
        if rc != 0:
            print(text[-4000:])
            print("the named tests fail without any mutation: fix them first")
            return 2
        rows = []
        for m in chosen:
            target = copy_path(dest, m.file)
            original = target.read_text()
            count = original.count(m.old)
            if count != 1:
                rows.append((m, f"pattern found {count} times", "-", False, 0.0))
                print(f"?? {m.name}: pattern found {count} times in {m.file}", flush=True)
                continue
            target.write_text(original.replace(m.old, m.new))
            try:
                rc, text, secs = run_pytest(dest, m.tests)
            finally:
                target.write_text(original)
            # Caught: tests ran and failed (rc 1), or the run crashed (a signal); not a timeout,
            # an interrupted run, a usage error or no tests collected.
            caught = rc == 1 or rc < -1
            catcher = ", ".join(failed_tests(text)[:2]) or ("timeout" if rc == -1 else
                                                            f"crashed (signal {-rc})" if rc < 0 else f"pytest rc {rc}")
            rows.append((m, "", catcher, caught, secs))
            print(f"{'caught  ' if caught else 'SURVIVED'} {m.name} ({secs:.0f} s): {catcher}", flush=True)
    survivors = [r for r in rows if not r[3]]
    table = render(rows)
    print(table)
    if not args.k:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip() or "unknown"
        path = out / f"{datetime.date.today().isoformat()}_{commit}_mutations.md"
        path.write_text(f"# Mutation check ({commit})\n\n`python tests/mutation/run_mutations.py`: each planted bug "
                        f"runs only the tests named for it. {len(rows) - len(survivors)}/{len(rows)} caught.\n\n"
                        + table + "\n")
        print(f"wrote {path}")
    return 1 if survivors else 0


def render(rows) -> str:
    lines = ["| mutation | file | catching test | caught | s |", "|---|---|---|---|---:|"]
    for m, problem, catcher, caught, secs in rows:
        catcher = problem or catcher
        lines.append(f"| {m.name} | `{m.file}` | `{catcher}` | {'yes' if caught else 'NO'} | {secs:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
