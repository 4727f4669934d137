"""lm-evaluation-harness as a real client of the server: `local-completions` on a multiple-choice task
(log-likelihoods through `echo` + `logprobs`) and a `generate_until` task, and `local-chat-completions`
on the generation task, against a nudged pair and the base model alone. Every sample's result equals
what the engine computes directly for the same tokens, and so do the scores."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from test_server import ServerProcess

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval[api] is a test dependency")
pytestmark = pytest.mark.slow

MC_DOCS = [
    {"question": "The sky is", "choices": [" blue", " green", " made of cheese"], "label": 0},
    {"question": "Cats like to", "choices": [" sleep", " fly", " read novels"], "label": 0},
    {"question": "Water is", "choices": [" dry", " wet"], "label": 1},
    {"question": "One plus one is", "choices": [" two", " seven", " a fish"], "label": 0},
]
GEN_DOCS = [
    {"question": "Question: What colour is the sky?\nAnswer:", "answer": " blue"},
    {"question": "Question: Name a fruit.\nAnswer:", "answer": " apple"},
    {"question": "Once upon a time", "answer": " there"},
]
MAX_GEN_TOKS = 8
UNTIL = ["\n"]


def _write_tasks(folder) -> None:
    for name, docs in (("mc", MC_DOCS), ("gen", GEN_DOCS)):
        with open(folder / f"{name}.jsonl", "w") as f:
            for d in docs:
                f.write(json.dumps(d) + "\n")
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {{path}}\ntest_split: test\n"
              "doc_to_text: \"{{{{question}}}}\"\n")
    (folder / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n" + common.format(path=folder / "mc.jsonl") +
        "output_type: multiple_choice\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n")
    (folder / "tiny_gen.yaml").write_text(
        "task: tiny_gen\n" + common.format(path=folder / "gen.jsonl") +
        "output_type: generate_until\ndoc_to_target: \"{{answer}}\"\n"
        f"generation_kwargs:\n  until: {json.dumps(UNTIL)}\n  max_gen_toks: {MAX_GEN_TOKS}\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")


def _evaluate(lm, folder, tasks):
    from lm_eval.tasks import TaskManager
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=TaskManager(include_path=str(folder)),
                                   log_samples=True, limit=None, bootstrap_iters=0)


@pytest.fixture(scope="module", params=["nudged", "base-alone"])
def setup(request, tiny_pair, tmp_path_factory):
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    base, nudger = tiny_pair("llama", "llama", "bytelevel", 0.5)
    folder = tmp_path_factory.mktemp(f"lm-eval-{request.param}")
    _write_tasks(folder)
    srv = ServerProcess(base, nudger if request.param == "nudged" else None, folder / "server.log")
    from nudge_engine.engine import NudgeEngine
    engine = NudgeEngine(base, nudger if request.param == "nudged" else None, num_blocks=256)
    yield srv, engine, folder, base
    srv.stop()
    assert engine.pools_all_free()


def _completions_lm(srv, base):
    from lm_eval.api.registry import get_model
    return get_model("local-completions")(
        base_url=srv.url + "/v1/completions", model=str(base), tokenizer=str(base), tokenizer_backend="huggingface",
        tokenized_requests=True, num_concurrent=1, max_retries=1, batch_size=1)


def test_multiple_choice_loglikelihoods_equal_the_engines(setup):
    from nudge_engine import load_model
    srv, engine, folder, base = setup
    lm = _completions_lm(srv, base)
    results = _evaluate(lm, folder, ["tiny_mc"])
    samples = results["samples"]["tiny_mc"]
    scorer = load_model(base)
    correct = 0
    for sample in samples:
        got = [r[0] for r in sample["resps"]]          # [(loglikelihood, is_greedy)] per choice
        expected = []
        for context, continuation in (a for a in sample["arguments"]):
            ctx, cont = lm._encode_pair(context, continuation)
            ids = ctx + cont
            logp = torch.log_softmax(scorer.score([ids])[0].double(), -1)   # [len(ids), vocab]
            rows = logp[len(ctx) - 1: len(ids) - 1]
            picked = rows[torch.arange(len(cont)), torch.tensor(cont)]
            expected.append((float(picked.sum()), bool((rows.argmax(-1) == torch.tensor(cont)).all())))
        for (ll, greedy), (ell, egreedy) in zip(got, expected):
            assert math.isclose(ll, ell, rel_tol=1e-4, abs_tol=1e-4), (sample["doc"], got, expected)
            assert bool(greedy) == egreedy
        correct += int(max(range(len(expected)), key=lambda i: expected[i][0]) == sample["target"])
    assert math.isclose(results["results"]["tiny_mc"]["acc,none"], correct / len(samples))


def _generate_directly(engine, prompts, stops) -> list[str]:
    from nudge_engine.engine.sampling_params import SamplingParams
    params = SamplingParams(max_tokens=MAX_GEN_TOKS, temperature=0, stop=stops)
    return [o.text for o in engine.generate(prompts, params)]


def test_generate_until_equals_the_engine(setup):
    srv, engine, folder, base = setup
    lm = _completions_lm(srv, base)
    results = _evaluate(lm, folder, ["tiny_gen"])
    samples = results["samples"]["tiny_gen"]
    stops = UNTIL + [lm.tokenizer.eos_token]
    direct = _generate_directly(engine, [lm.tok_encode(s["arguments"][0][0]) for s in samples], stops)
    assert [s["resps"][0][0] for s in samples] == direct
    expected = sum(d == s["target"] for d, s in zip(direct, samples)) / len(samples)
    assert math.isclose(results["results"]["tiny_gen"]["exact_match,none"], expected)


def test_chat_completions_client_equals_the_engine(setup):
    srv, engine, folder, base = setup
    from lm_eval.api.registry import get_model
    lm = get_model("local-chat-completions")(
        base_url=srv.url + "/v1/chat/completions", model=str(base), tokenizer_backend=None,
        tokenized_requests=False, num_concurrent=1, max_retries=1, batch_size=1)
    from lm_eval.tasks import TaskManager
    results = lm_eval.simple_evaluate(model=lm, tasks=["tiny_gen"], task_manager=TaskManager(include_path=str(folder)),
                                      log_samples=True, apply_chat_template=True, bootstrap_iters=0)
    samples = results["samples"]["tiny_gen"]
    prompts = []
    for s in samples:
        context = s["arguments"][0][0]
        messages = json.loads(context[0] if isinstance(context, tuple) else context)
        prompts.append({"messages": messages})
    direct = _generate_directly(engine, prompts, UNTIL)
    assert [s["resps"][0][0] for s in samples] == direct
