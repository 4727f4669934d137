"""The OpenAI-compatible HTTP server (FastAPI): completions, chat completions, models, health, metrics.

Routes
  POST /v1/completions, POST /v1/chat/completions   streaming (SSE, ends with `data: [DONE]`) or not
  GET  /v1/models      the base model as the model id, with the nudger and the pairing mode
  GET  /health         200 while the engine thread runs, 503 once it is dead (no API key needed)
  GET  /metrics        Prometheus text format

Errors use the OpenAI shape {"error": {"message", "type", "param", "code"}}: 400 for bad input
(never a 500), 401 without the API key, 404 for an unknown model or route, 413 for a body over
--max-body-bytes, 408 for a body that took longer than --body-timeout, 503 when --max-num-seqs running
plus --max-queue waiting requests are already in the engine or the engine is dead, 500 when the engine
failed while the request was in flight (streams get an error chunk instead, then [DONE]).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.engine import NudgeEngine
from ..engine.prompts import ChatFormat, tokenize_prompt
from ..engine.sampling_params import NudgeParams, SamplingParams
from . import protocol as P
from ..engine.async_nudge_engine import AsyncNudgeEngine
from ..engine.async_engine import (AsyncEngine, EngineDeadError, EngineStepError, GenerateItem, GroupError,
                           InvalidRequestError, QueueFullError, RequestFailedError, ShuttingDownError)
from .guard import DEFAULT_BODY_TIMEOUT_S, GuardMiddleware
from .limits import RequestLimits
from .metrics import ServerMetrics
from .openapi import ROUTE_RESPONSES, document_responses
from .responses import (RETRY_AFTER_S, APIError, Echo, _AbortingStreamingResponse, _clean_logprobs, _ClientGone,
                        _sse, _wait_unless_disconnected, bad_request)

log = logging.getLogger("nudge_engine.server")

DEFAULT_MAX_BODY_BYTES = 1 << 20
PROMPT_THREADS = 8      # threads that render chat templates and tokenize prompts (never the event loop)
DEFAULT_COMPLETION_MAX_TOKENS = 16      # OpenAI's legacy completions default (at most what the request has room for)
DEFAULT_CHAT_MAX_TOKENS = 1024          # chat: at most this many, and what the request has room for


@dataclass
class ServerSettings:
    model_name: str
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_queue: int = 512
    allow_request_chat_template: bool = False
    default_chat_max_tokens: int = DEFAULT_CHAT_MAX_TOKENS
    body_timeout: float = DEFAULT_BODY_TIMEOUT_S


# ---------------------------------------------------------------------------- the app
def build_app(engine: NudgeEngine, settings: ServerSettings, *, fault_steps: frozenset[int] | None = None,
              async_engine: AsyncEngine | None = None) -> FastAPI:
    metrics = ServerMetrics(settings.model_name)
    ae = async_engine or AsyncNudgeEngine(engine, max_queue=settings.max_queue, fault_steps=fault_steps, metrics=metrics)
    ae.metrics = metrics
    metrics.attach(ae)
    base_tok = engine.base.tokenizer
    # The text path (pairing/text_logprobs.py): logprobs name written tokens by joint id, not token_ids.
    lp_vocab = getattr(engine, "logprob_vocab", None) or base_tok

    def lp_ids(x) -> list[int]:
        ids = getattr(x, "logprob_token_ids", None)
        return x.token_ids if ids is None else ids

    nudger_tok = engine.nudger.tokenizer if engine.nudger is not None else None
    for m in engine.models:
        if m.tokenizer.chat_template_error:
            log.warning("%s", m.tokenizer.chat_template_error)
    limits = RequestLimits(engine)   # what one request can hold (limits.py)
    base_path = str(engine.base.path)
    aliases = {settings.model_name, base_path, str(Path(base_path).resolve()), Path(base_path).name}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        ae.start(asyncio.get_running_loop())
        prompt_threads.append(ThreadPoolExecutor(PROMPT_THREADS, thread_name_prefix="nudge-prompt"))
        try:
            yield
        finally:
            prompt_threads.pop().shutdown(wait=False, cancel_futures=True)
            await asyncio.to_thread(ae.shutdown, 10.0)

    # Prompts are prepared on threads of their own (the running app's): a chat template that takes its whole
    # time budget (model/chat_sandbox.py) delays other prompts at most, never the responses built on asyncio's.
    prompt_threads: list[ThreadPoolExecutor] = []

    async def off_loop(fn):
        return await asyncio.get_running_loop().run_in_executor(prompt_threads[-1] if prompt_threads else None, fn)

    app = FastAPI(title="nudge_engine", version="0.1.0", lifespan=lifespan)
    app.state.async_engine = ae
    app.state.settings = settings
    app.add_middleware(GuardMiddleware, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes,
                       body_timeout=settings.body_timeout)

    # ------------------------------------------------------------ error handlers
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = loc[0] if loc else None
        kind = first.get("type", "")
        if kind == P.UNICODE_ERROR:
            message = first.get("msg", "a string is not valid Unicode text")
            param = str((first.get("ctx") or {}).get("where", "")).split(".")[0].split("[")[0]
            param = None if param.startswith("key '") else param   # a bad key of the body itself
        elif kind == "json_invalid":
            param = None
            message = f"the body is not valid JSON ({(first.get('ctx') or {}).get('error', 'parse error')})"
        elif param == "prompt" and len(loc) > 1 and not loc[1].isdigit():
            message = ("prompt must be a string, a list of strings, a list of token ids or a list of token-id "
                       "lists")
        elif param == "messages" and len(errors) > 1:
            message = (f"{'.'.join(loc)}: {first.get('msg', 'invalid value')}; messages are objects with a string "
                       "'role' and a string (or text parts) 'content'")
        elif not loc and kind in ("model_attributes_type", "dict_type", "model_type"):
            message = "the body must be a JSON object"
        elif not loc and kind == "missing":
            message = "the body is empty; send a JSON object"
        else:
            message = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid value')}"
            if len(errors) > 1:
                message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
        return JSONResponse(P.error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(P.error_body(str(exc.detail), kind), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(P.error_body(f"internal server error ({type(exc).__name__})", "server_error", None, 500),
                            status_code=500)

    # ------------------------------------------------------------ helpers
    def check_model(model: str | None) -> None:
        if model is not None and model not in aliases:
            raise APIError(404, f"the model '{model}' does not exist; this server serves '{settings.model_name}'",
                           "invalid_request_error", "model", "model_not_found")

    def check_supported(body) -> None:
        found = body.unsupported()
        if found:
            raise bad_request(found[1], found[0])

    def make_params(body, max_tokens: int, logprobs: int | None,
                    prompt_logprobs: int | None = None) -> tuple[list[SamplingParams], NudgeParams]:
        try:
            stops = body.stop_list()
        except ValueError as e:
            raise bad_request(str(e), "stop") from None
        kw: dict[str, Any] = dict(max_tokens=max_tokens, stop=stops, ignore_eos=body.ignore_eos,
                                  stop_token_ids=body.stop_token_ids or [], logprobs=logprobs,
                                  prompt_logprobs=prompt_logprobs,
                                  include_stop_str_in_output=body.include_stop_str_in_output)
        for name in ("temperature", "top_p", "top_k", "min_p"):
            value = getattr(body, name)
            if value is not None:
                kw[name] = value
        params = []
        try:
            for i in range(body.n):
                seed = body.seed
                if seed is not None and i:
                    seed = (seed + i) % (2**64)
                params.append(SamplingParams(seed=seed, **kw))
            nudge = NudgeParams(gamma=body.gamma, draft_tokens=body.draft_tokens,
                                resume_on_agreement=body.resume_on_agreement,
                                nudger_temperature=body.nudger_temperature, nudger_top_p=body.nudger_top_p,
                                nudger_top_k=body.nudger_top_k)
        except ValueError as e:
            raise bad_request(str(e)) from None
        return params, nudge

    async def submit(items: list[GenerateItem], defaulted: str | None = None):
        try:
            return await ae.submit(items)
        except QueueFullError as e:
            raise APIError(503, str(e), "server_error", None, "server_overloaded") from None
        except EngineDeadError as e:
            raise APIError(503, f"the engine is not running: {e}", "server_error", None, "engine_dead") from None
        except InvalidRequestError as e:
            raise bad_request(f"{e} ({defaulted})" if defaulted else str(e)) from None

    async def run_group(group, request: Request):
        try:
            return await _wait_unless_disconnected(group.collect(), request)
        except _ClientGone:
            group.abort()
            return None
        except EngineStepError as e:
            raise APIError(500, str(e), "server_error", None, "engine_error") from None
        except RequestFailedError as e:
            raise APIError(500, str(e), "server_error", None, "request_failed") from None
        except ShuttingDownError as e:
            raise APIError(503, str(e), "server_error", None, "server_shutting_down") from None
        except EngineDeadError as e:
            raise APIError(503, f"the engine stopped: {e}", "server_error", None, "engine_dead") from None
        finally:
            group.abort()

    def error_chunk(error: Exception) -> dict:
        if isinstance(error, EngineStepError):
            return P.error_body(str(error), "server_error", None, "engine_error")
        if isinstance(error, RequestFailedError):
            return P.error_body(str(error), "server_error", None, "request_failed")
        if isinstance(error, ShuttingDownError):
            return P.error_body(str(error), "server_error", None, "server_shutting_down")
        return P.error_body(f"the engine stopped: {error}", "server_error", None, "engine_dead")

    def streaming(gen, group) -> StreamingResponse:
        return _AbortingStreamingResponse(gen, group, media_type="text/event-stream",
                                          headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def with_nudge_fields(choice: dict, sources: list[str], out) -> dict:
        """The extra fields every choice carries: token sources, and once finished the stop and nudged fraction."""
        choice["sources"] = sources
        if out is not None:
            choice["stop_reason"] = out.stop_reason
            choice["nudged_fraction"] = out.nudged_fraction
        return choice

    async def sse_events(group, header: dict, make_choice, include_usage: bool, prompt_tokens: int,
                         preamble: list[dict] = ()):
        """The SSE stream of one request group: choice chunks, an error chunk if the engine fails,
        then usage (when asked) and [DONE]. make_choice(event) -> the choice dict of one chunk."""
        for choice in preamble:
            yield _sse({**header, "choices": [choice]})
        completion_tokens, failed = 0, False
        async for ev in group.events():
            if isinstance(ev, GroupError):
                yield _sse(error_chunk(ev.error))
                failed = True
                break
            completion_tokens += len(ev.token_ids)
            yield _sse({**header, "choices": [with_nudge_fields(make_choice(ev), ev.sources, ev.output)]})
        if include_usage and not failed:
            yield _sse({**header, "choices": [], "usage": P.usage(prompt_tokens, completion_tokens)})
        yield "data: [DONE]\n\n"

    async def final_response(group, request: Request, header: dict, make_choice, prompt_tokens: int):
        """The non-streamed body: make_choice(index, output) -> the choice dict. Built and serialized in a
        worker thread: with n choices of many tokens and top logprobs it is megabytes, which on the event
        loop would stall every other client (and /health) for seconds."""
        outputs = await run_group(group, request)
        if outputs is None:
            return Response(status_code=499)

        def build() -> bytes:
            choices = [with_nudge_fields(make_choice(i, out), out.sources, out) for i, out in enumerate(outputs)]
            body = {**header, "choices": choices,
                    "usage": P.usage(prompt_tokens, sum(len(o.token_ids) for o in outputs))}
            return json.dumps(body, ensure_ascii=False, allow_nan=False).encode()

        return Response(await asyncio.to_thread(build), media_type="application/json")

    # ------------------------------------------------------------ routes
    @app.api_route("/health", methods=["GET", "HEAD"], responses=ROUTE_RESPONSES["/health"])
    async def health():
        if ae.alive:
            return {"status": "ok"}
        return JSONResponse({"status": "unavailable", "reason": ae.dead_reason or "the engine is not running"},
                            status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})

    @app.get("/metrics", response_class=PlainTextResponse, responses=ROUTE_RESPONSES["/metrics"])
    async def metrics_route():
        data, content_type = metrics.render()
        return Response(data, media_type=content_type)

    @app.get("/v1/models", responses=ROUTE_RESPONSES["/v1/models"])
    async def models():
        return {"object": "list", "data": [{
            "id": settings.model_name, "object": "model", "created": P.now(), "owned_by": "nudge_engine",
            "root": base_path, **limits.advertised(),
            "nudger": str(engine.nudger.path) if engine.nudger is not None else None,
            "pairing": engine.pairing if engine.nudger is not None else "base-alone",
            "gamma": engine.defaults.gamma, "draft_tokens": engine.defaults.draft_tokens,
            "resume_on_agreement": engine.defaults.resume_on_agreement,
        }]}

    @app.post("/v1/completions", responses=ROUTE_RESPONSES["/v1/completions"])
    async def completions(body: P.CompletionRequest, request: Request):
        check_model(body.model)
        check_supported(body)
        p = body.prompt
        single = isinstance(p, str) or not p or isinstance(p[0], int)
        raw_prompts = [p] if single else list(p)
        if len(raw_prompts) > P.MAX_PROMPTS:
            raise bad_request(f"at most {P.MAX_PROMPTS} prompts per request, got {len(raw_prompts)}", "prompt")
        if body.base_prompt is not None:
            if len(raw_prompts) != 1:
                raise bad_request("base_prompt goes with a single prompt", "base_prompt")
            raw_prompts = [{"base": body.base_prompt, "nudger": raw_prompts[0]}]
        if len(raw_prompts) * body.n > P.MAX_N:
            raise bad_request(f"n x prompts must be at most {P.MAX_N}, got {body.n} x {len(raw_prompts)}", "n")

        def tokenize_all() -> list[tuple[list[int], list[int] | None]]:
            try:
                return [tokenize_prompt(raw, base_tok, nudger_tok, engine.chat_format) for raw in raw_prompts]
            except ValueError as e:
                raise bad_request(str(e), "prompt") from None

        # Tokenizing a megabyte of text takes a second: never on the event loop (README: How it runs).
        tokenized = await off_loop(tokenize_all)
        prompts, base_prompts, prompt_tokens, longest = [], [], 0, 0
        for base_ids, nudger_ids in tokenized:
            prompt, length = limits.engine_prompt(base_ids, nudger_ids, "prompt")
            prompts.append(prompt)
            base_prompts.append(base_ids)
            prompt_tokens += len(base_ids)
            longest = max(longest, length)
        max_tokens, defaulted = body.max_tokens, None
        if max_tokens is None:
            max_tokens, defaulted = limits.default_max_tokens(DEFAULT_COMPLETION_MAX_TOKENS, "OpenAI's for completions",
                                                       longest)
        n_logprobs = body.logprobs
        params, nudge = make_params(body, max_tokens, n_logprobs,
                                    prompt_logprobs=n_logprobs if body.echo else None)
        items = [GenerateItem(pr, sp, nudge) for pr in prompts for sp in params]
        echoes = ([Echo(raw if isinstance(raw, str) else base_tok.decode(ids, skip_special_tokens=False), ids)
                   for raw, ids in zip(raw_prompts, base_prompts) for _ in params]
                  if body.echo else [None] * len(items))
        group = await submit(items, defaulted)
        header = {"id": P.new_id("cmpl"), "object": "text_completion", "created": P.now(),
                  "model": settings.model_name}

        if body.stream:
            offsets = [0] * len(items)
            echoed = [not body.echo] * len(items)

            def chunk_choice(ev) -> dict:
                text, lp, i = ev.text, None, ev.index
                if not echoed[i] and (ev.token_ids or ev.finish_reason is not None):
                    echoed[i] = True
                    text = echoes[i].text + text
                    if n_logprobs is not None:
                        lp, offsets[i] = echoes[i].logprobs(base_tok, ev.prompt_logprobs, n_logprobs)
                if n_logprobs is not None:
                    more, offsets[i] = P.completion_logprobs(
                        lp_vocab, lp_ids(ev), _clean_logprobs(ev.logprobs), n_logprobs, offsets[i])
                    lp = more if lp is None else P.join_completion_logprobs(lp, more)
                return {"index": i, "text": text, "logprobs": lp, "finish_reason": ev.finish_reason}

            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return streaming(sse_events(group, header, chunk_choice, include_usage, prompt_tokens), group)

        def final_choice(index: int, out) -> dict:
            lp, offset, text = None, 0, out.text
            if echoes[index] is not None:
                text = echoes[index].text + text
                if n_logprobs is not None:
                    lp, offset = echoes[index].logprobs(base_tok, out.prompt_logprobs, n_logprobs)
            if n_logprobs is not None:
                more, _ = P.completion_logprobs(lp_vocab, lp_ids(out), _clean_logprobs(out.logprobs), n_logprobs,
                                                offset)
                lp = more if lp is None else P.join_completion_logprobs(lp, more)
            return {"index": index, "text": text, "logprobs": lp, "finish_reason": out.finish_reason}

        return await final_response(group, request, header, final_choice, prompt_tokens)

    @app.post("/v1/chat/completions", responses=ROUTE_RESPONSES["/v1/chat/completions"])
    async def chat_completions(body: P.ChatCompletionRequest, request: Request):
        check_model(body.model)
        check_supported(body)
        try:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        except ValueError as e:
            raise bad_request(str(e), "messages") from None
        fmt = ChatFormat(engine.chat_format.base_template,
                         engine.chat_format.response_prefix if body.response_prefix is None else body.response_prefix)
        if body.chat_template is not None and not settings.allow_request_chat_template:
            raise bad_request("chat_template in a request is refused by this server (the operator can allow "
                              "it with --allow-request-chat-template)", "chat_template")

        def render_and_tokenize():
            # prompts.py picks the renderings: the nudger's template, or the base model's own when it serves
            # alone. Templates render in a sandboxed process with a time and size budget (model/chat_sandbox.py).
            try:
                return tokenize_prompt({"messages": messages, "response_prefix": fmt.response_prefix,
                                        "chat_template": body.chat_template}, base_tok, nudger_tok, engine.chat_format)
            except Exception as e:  # noqa: BLE001 - a template error is the request's fault
                raise bad_request(f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e),
                                  "chat_template" if body.chat_template is not None else "messages") from None

        base_ids, nudger_ids = await off_loop(render_and_tokenize)
        prompt, longest = limits.engine_prompt(base_ids, nudger_ids, "messages")
        max_tokens, defaulted = body.max_completion_tokens or body.max_tokens, None
        if max_tokens is None:
            max_tokens, defaulted = limits.default_max_tokens(settings.default_chat_max_tokens, "--default-max-tokens",
                                                       longest)
        n_top = (body.top_logprobs or 0) if body.logprobs else None
        params, nudge = make_params(body, max_tokens, n_top)
        group = await submit([GenerateItem(prompt, sp, nudge) for sp in params], defaulted)
        header = {"id": P.new_id("chatcmpl"), "object": "chat.completion.chunk", "created": P.now(),
                  "model": settings.model_name}
        prompt_tokens = len(base_ids)

        def logprobs_of(token_ids, logprobs):
            return P.chat_logprobs(lp_vocab, token_ids, _clean_logprobs(logprobs), n_top) if n_top is not None else None

        if body.stream:
            def chunk_choice(ev) -> dict:
                return {"index": ev.index, "delta": {"content": ev.text}, "logprobs": logprobs_of(lp_ids(ev), ev.logprobs),
                        "finish_reason": ev.finish_reason}

            roles = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                     for i in range(body.n)]
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return streaming(sse_events(group, header, chunk_choice, include_usage, prompt_tokens, roles), group)

        def final_choice(index: int, out) -> dict:
            return {"index": index, "message": {"role": "assistant", "content": out.text},
                    "logprobs": logprobs_of(lp_ids(out), out.logprobs), "finish_reason": out.finish_reason}

        return await final_response(group, request, {**header, "object": "chat.completion"}, final_choice,
                                    prompt_tokens)

    default_openapi = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = document_responses(default_openapi())
        return app.openapi_schema

    app.openapi = openapi
    return app
