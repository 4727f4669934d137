"""How much one request can hold, what /v1/models advertises, and what a left-out max_tokens becomes.

One request (prompt + output) must fit every model's context and every model's whole KV pool, so the
server serves `max_model_len = min(context, pool tokens)`: that is what /v1/models advertises (with
both parts), what a prompt must leave room in, and what a max_tokens the client leaves out is clamped
to (the default or the room the prompt leaves, whichever is less, as vLLM does). A max_tokens the
client sent is never lowered: the engine refuses it by name when it does not fit.
"""
from __future__ import annotations

from .responses import bad_request


class RequestLimits:
    def __init__(self, engine):
        pool = engine.base.pool
        self.context = min(m.config.max_position_embeddings for m in engine.models)
        self.kv_tokens = min(m.pool.num_blocks * m.pool.block_size for m in engine.models)
        self.max_model_len = min(self.context, self.kv_tokens)
        self.bound = (f"the model's context of {self.context} tokens" if self.context <= self.kv_tokens else
                      f"a whole KV pool ({self.kv_tokens} tokens: {pool.num_blocks} blocks of {pool.block_size}; "
                      f"the model's context is {self.context})")
        self.has_nudger = engine.nudger is not None

    def advertised(self) -> dict:
        """The /v1/models fields."""
        return {"max_model_len": self.max_model_len, "context_length": self.context, "kv_cache_tokens": self.kv_tokens}

    def engine_prompt(self, base_ids: list[int], nudger_ids: list[int] | None, param: str):
        """(the engine's prompt, its longest tokenization); a 400 when it is empty or leaves no room."""
        if not base_ids or (self.has_nudger and not nudger_ids):
            raise bad_request("the prompt is empty after tokenization", param)
        longest = max(len(base_ids), len(nudger_ids or ()))
        if longest >= self.max_model_len:
            raise bad_request(f"the prompt ({longest} tokens) leaves no room for a completion: one request holds at "
                              f"most {self.max_model_len} tokens here, {self.bound}", param)
        return ({"base": base_ids, "nudger": nudger_ids} if nudger_ids is not None else base_ids), longest

    def default_max_tokens(self, default: int, flag: str, longest: int) -> tuple[int, str]:
        """(max_tokens, what error messages say about it) for a request that sent none."""
        room = self.max_model_len - longest
        value = min(default, room)
        return value, (f"max_tokens was not sent: the server used {value}, the smaller of its default "
                       f"({default}, {flag}) and the room the prompt leaves ({room} of {self.max_model_len} tokens)")
