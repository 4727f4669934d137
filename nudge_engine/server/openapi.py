"""The OpenAPI document says what the server really answers: the response bodies (JSON and SSE), every
error status with the OpenAI error shape, and no 422 (validation errors are 400 here).

The response models below are documentation only (the routes build plain dicts); schemathesis
checks in the tests that real responses conform to them.
"""
from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel

ERROR_STATUSES = {
    "400": "Invalid request: malformed JSON, a wrong or out-of-range field, an unsupported field, a prompt that "
           "does not fit the context or the KV pools",
    "401": "Missing or wrong API key (when the server has one)",
    "404": "Unknown model",
    "408": "The whole request body did not arrive within --body-timeout seconds of its headers",
    "413": "The request body is larger than --max-body-bytes",
    "500": "The engine failed while this request was in flight",
    "503": "The engine holds --max-num-seqs running plus --max-queue waiting requests, or it is not running (see Retry-After)",
}
SSE_DESCRIPTION = ("With `stream: true`: server-sent events, one `data: {chunk}` line each (an error object if "
                   "the engine fails), then `data: [DONE]`.")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Union[str, None] = None
    code: Union[str, int, None] = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[Union[float, None]]
    top_logprobs: list[Union[dict[str, float], None]]
    text_offset: list[int]


class _NudgeFields(BaseModel):
    sources: list[Literal["base", "nudger"]]
    stop_reason: Union[str, int, None] = None
    nudged_fraction: Union[float, None] = None


class CompletionChoice(_NudgeFields):
    index: int
    text: str
    logprobs: Union[CompletionLogprobs, None]
    finish_reason: Union[Literal["stop", "length"], None]


class _Response(BaseModel):
    id: str
    created: int
    model: str
    usage: Usage


class CompletionResponse(_Response):
    object: Literal["text_completion"]
    choices: list[CompletionChoice]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    logprob: Union[float, None]
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(_NudgeFields):
    index: int
    message: AssistantMessage
    logprobs: Union[ChatLogprobs, None]
    finish_reason: Union[Literal["stop", "length"], None]


class ChatCompletionResponse(_Response):
    object: Literal["chat.completion"]
    choices: list[ChatChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    max_model_len: int
    nudger: Union[str, None]
    pairing: str
    gamma: float
    draft_tokens: int
    resume_on_agreement: bool


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    reason: Union[str, None] = None


def _json(model: type[BaseModel], description: str) -> dict:
    return {"description": description, "model": model}


def _errors(*codes: str) -> dict:
    return {int(c): _json(ErrorResponse, ERROR_STATUSES[c]) for c in codes}


# One server-sent event, as OpenAPI documents text/event-stream (on 3.0 / 3.1 `schema` is the per-event
# schema): each `data` is a JSON chunk, an error object, or the closing "[DONE]".
SSE_EVENT = {"type": "object", "required": ["data"], "properties": {
    "data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"},
    "retry": {"type": "integer"}}}


def _sse() -> dict:
    return {"text/event-stream": {"schema": SSE_EVENT}}


GENERATION_ERRORS = ("400", "401", "404", "408", "413", "500", "503")

ROUTE_RESPONSES: dict[str, dict] = {
    "/v1/completions": {200: {**_json(CompletionResponse, "The completion (JSON), or " + SSE_DESCRIPTION),
                              "content": _sse()}, **_errors(*GENERATION_ERRORS)},
    "/v1/chat/completions": {200: {**_json(ChatCompletionResponse, "The chat completion (JSON), or " + SSE_DESCRIPTION),
                                   "content": _sse()}, **_errors(*GENERATION_ERRORS)},
    "/v1/models": {200: _json(ModelList, "The served model"), **_errors("401")},
    "/health": {200: _json(Health, "The engine thread runs"), 503: _json(Health, "The engine is not running")},
    "/metrics": {200: {"description": "Prometheus text format",
                       "content": {"text/plain": {"schema": {"type": "string"}}}}, **_errors("401")},
}


def document_responses(schema: dict[str, Any]) -> dict[str, Any]:
    """Drops FastAPI's 422 (this server answers 400) and its validation-error schemas."""
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            if isinstance(operation, dict):
                operation.get("responses", {}).pop("422", None)
    components = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    return schema
