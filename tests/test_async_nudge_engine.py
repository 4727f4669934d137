"""nudge_engine.AsyncNudgeEngine: the engine for asyncio programs (what the server is built on)."""
import asyncio

import pytest

from nudge_engine import AsyncNudgeEngine, NudgeEngine, NudgeParams, SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
NUDGE = NudgeParams(gamma=0.5)


@pytest.fixture(scope="module")
def pair(tiny_pair):
    return tiny_pair("llama", "llama", "bytelevel", 0.5)


def test_stream_and_generate_equal_the_engine_and_cancellation_frees_the_request(pair):
    want = NudgeEngine(*pair).generate(["Hi", "The sea"], GREEDY, NUDGE)
    engine = NudgeEngine(*pair)

    async def main():
        front = AsyncNudgeEngine(engine)
        try:
            outs = await asyncio.gather(front.generate("Hi", GREEDY, NUDGE), front.generate("The sea", GREEDY, NUDGE))
            tokens, sources = [], []
            async for delta in front.stream("Hi", GREEDY, NUDGE):
                tokens += delta.token_ids
                sources += delta.sources
            last = delta
            long = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
            task = asyncio.ensure_future(front.generate("Hi", long, NUDGE))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            early = front.stream("Hi", long, NUDGE)
            async for _ in early:
                break
            await early.aclose()                    # leaving the loop early aborts the request
            for _ in range(200):
                if front.health()["running"] == 0 and front.health()["waiting"] == 0:
                    break
                await asyncio.sleep(0.01)
            return outs, tokens, sources, last, front.health()
        finally:
            front.shutdown()

    outs, tokens, sources, last, health = asyncio.run(main())
    assert [o.token_ids for o in outs] == [w.token_ids for w in want]
    assert [o.sources for o in outs] == [w.sources for w in want]
    assert tokens == want[0].token_ids and sources == want[0].sources
    assert last.finish_reason == "length" and last.output.text == want[0].text
    assert health["alive"] and health["running"] == 0 and health["waiting"] == 0
    assert not engine.has_unfinished() and engine.pools_all_free()
