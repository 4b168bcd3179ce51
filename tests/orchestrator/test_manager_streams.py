"""A client leaving a stream ends the engine's stream at once (defect (c) of issue 12): the manager closes the
chain's stream explicitly, so the engine's lease and its work do not wait for garbage collection."""

from __future__ import annotations

import pytest

from adapters.base import GenerationRequest, SamplingParams
from adapters.echo import EchoEngine
from muai.config import MuaiConfig
from orchestrator.manager import ModelManager

pytestmark = pytest.mark.timeout(60)


class ClosingEcho(EchoEngine):
    """The echo engine, noting when one of its streams ends and how."""

    ended: list[str] = []

    async def generate_stream(self, request):
        outcome = "finished"
        try:
            async for chunk in super().generate_stream(request):
                yield chunk
        except GeneratorExit:
            outcome = "closed"
            raise
        finally:
            ClosingEcho.ended.append(outcome)


async def test_leaving_a_stream_closes_the_engines_stream_at_once():
    ClosingEcho.ended = []
    cfg = MuaiConfig(models=[{"name": "e", "path": "/nonexistent-is-fine-for-echo", "engine": "echo"}],
                     engines={"preference": ["echo"]}, batching={"enabled": False})
    m = ModelManager(cfg, engine_factory=lambda name, s: ClosingEcho(s))
    await m.aload_model("e")
    stream = m.generate_stream("e", GenerationRequest("one two three four five", SamplingParams(max_new_tokens=5)))
    first = await anext(stream)
    assert first.text and ClosingEcho.ended == []
    await stream.aclose()
    # No turn of the event loop in between: the engine's stream was closed by the close itself, not by a
    # finaliser scheduled later.
    assert ClosingEcho.ended == ["closed"]
    chunks = [c async for c in m.generate_stream("e", GenerationRequest("a b", SamplingParams(max_new_tokens=2)))]
    assert chunks[-1].finish_reason and ClosingEcho.ended == ["closed", "finished"]
    await m.aclose()
