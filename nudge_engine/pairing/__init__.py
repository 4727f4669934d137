"""The pairings: how one round of nudging is done for a given pair of models (NUDGING.md sections 2, 5, 7).

NudgeEngine (nudge_engine/engine/engine.py) owns loading, the scheduler, the requests, the public API and the
statistics; it picks ONE pairing at construction and hands it the per-round work:

  token.py  TokenPairing: the base alone, or a nudger with the same tokenizer (the token path:
            drafts verified token by token, sampling, logprobs, adaptive drafting);
  text.py   TextPairing: tokenizers that differ (the text path of section 7: the shared state is
            the output text, each model reads the other's finished words; greedy and seeded
            sampling, adaptive drafting, stops, logprobs per written token);
  handoff.py, handoff_torch.py, sampling_walk.py: the token path's decision rules (greedy walk,
            fused top-1/handoff step and its torch reference, rejection-sampling walk);
  device_drafts.py: the token path's draft passes, kept on the device (placeholders on the host);
  host_read.py: the one counted door from the device to the host in a round;
  wordpieces.py, spans.py, text_request.py, text_stops.py, text_sampling.py, text_logprobs.py: the
            text path's word pieces, span text, request, stop rules, who samples what (with its
            exactness proof), and what its logprobs mean.

A pairing implements the small interface below and reads the engine it serves (models, scheduler,
requests, stats, per-step failure set) through `self.engine`. Modules here may import model/, layers/,
kernels/ and engine/'s request-side modules (request, sampling_params, prompts, sampler, draft_policy),
never nudge_engine/engine/engine.py (nor distributed/): the engine imports the pairings, not the other way round.
"""
from __future__ import annotations

BASE_MODEL, NUDGER_MODEL = 0, 1   # index of each model in engine.models (and in every per-model list)


class Pairing:
    """The per-round work of one pairing. Every method that touches one request may raise: the engine
    then ends that request alone (finish_reason "error"); a failure of a batched pass propagates."""

    name: str = ""      # reported as engine.pairing

    def __init__(self, engine):
        self.engine = engine

    def new_request(self, prompt, params, nudge):
        """Tokenizes and checks one request; takes its id from engine.new_id() once it is accepted.
        -> (request, [one _core.Sequence per model]) for the scheduler."""
        raise NotImplementedError

    def prepare(self, req) -> None:
        """Plans the request's round before scheduling (draft count, catch-up, scheduler lookahead)."""
        raise NotImplementedError

    def run_round(self, reqs: list, sched) -> list:
        """Drafts, verifies in ONE base pass, decides and applies for the scheduled requests.
        -> the requests that got tokens or finished (not those marked failed in engine.failed)."""
        raise NotImplementedError
