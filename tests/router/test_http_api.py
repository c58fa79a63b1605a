"""The router's OpenAI-compatible HTTP API against a real cluster (etcd, a mixed worker, the router).

Clients: the official ``openai`` package, and raw aiohttp requests for what it will not
send (malformed bodies, wrong types) and for hanging up mid-stream. Expected outputs come
from the in-process engine on the same checkpoint and the same token ids.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
import urllib.parse

import aiohttp
import openai
import pytest
import pytest_asyncio
from tokenizers import Tokenizer

from router.chat_template import DEFAULT_CHATML_TEMPLATE, ChatTemplate, ChatTemplateError
from router.server import RouterServer, RouterServerConfig
from services.engine.engine import LLMEngine
from services.engine.request import SamplingParams
from services.engine.tokenizer import TextTokenizer
from tests.router.conftest import DEMO_MODEL_DIR

pytestmark = pytest.mark.asyncio(loop_scope="module")

MODEL = DEMO_MODEL_DIR.name
PROMPT = "import os\n"  # the demo model repeats it, with blank lines: good for stop strings
MESSAGES = [{"role": "system", "content": "You write Python."},
            {"role": "user", "content": [{"type": "text", "text": "def main():"}]}]
_REQUEST_TIMEOUT_S = 60.0
_ABORT_WAIT_S = 10.0
_LONG_STREAM_TOKENS = 1000


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def reference():
    """The demo model in-process (default engine config), the reference for every output."""
    return await asyncio.to_thread(LLMEngine.from_pretrained, DEMO_MODEL_DIR)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(DEMO_MODEL_DIR / "tokenizer.json"))


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def client(cluster):
    c = openai.AsyncOpenAI(base_url=cluster.http_url + "/v1", api_key="x", timeout=_REQUEST_TIMEOUT_S,
                           max_retries=0)
    yield c
    await c.close()


@pytest_asyncio.fixture(loop_scope="module")
async def http(cluster):
    async with aiohttp.ClientSession(cluster.http_url,
                                     timeout=aiohttp.ClientTimeout(total=_REQUEST_TIMEOUT_S)) as session:
        yield session


async def expected(reference: LLMEngine, prompt: str | list[int], **params):
    [completion] = await asyncio.to_thread(reference.generate, [prompt], SamplingParams(temperature=0, **params))
    return completion


def chat_prompt_ids(tokenizer: Tokenizer, messages) -> list[int]:
    template = ChatTemplate.from_model_dir(DEMO_MODEL_DIR, None)
    flat = [{**m, "content": m["content"] if isinstance(m["content"], str) else "\n".join(
        p["text"] for p in m["content"])} for m in messages]
    return tokenizer.encode(template.render(flat)).ids


# -- models, health, metrics ---------------------------------------------------------------


async def test_models_health_metrics(cluster, client, http):
    models = await client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].owned_by == "tandem"
    async with http.get("/v1/models") as r:
        assert (await r.json())["data"][0]["max_model_len"] == cluster.worker.aengine.engine.max_model_len
    async with http.get("/health") as r:
        assert r.status == 200 and (await r.json()) == {"status": "ok", "models": [MODEL]}
    cancelled_before = _cancelled_requests(cluster)
    await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
    for _ in range(50):  # per-worker gauges appear once the worker's first load report reached etcd
        async with http.get("/metrics") as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = await r.text()
        if "tandem_worker_queue_depth{" in text:
            break
        await asyncio.sleep(0.1)
    for name in ('tandem_requests_total{status="ok"}', "tandem_ttft_seconds_bucket", "tandem_tpot_seconds_bucket",
                 "tandem_e2e_seconds_bucket", "tandem_kv_transfer_bytes_total", "tandem_kv_transfer_seconds_bucket",
                 "tandem_worker_queue_depth{", "tandem_worker_free_kv_blocks{"):
        assert name in text, name
    assert _cancelled_requests(cluster) == cancelled_before  # a finished request is not "cancelled"


# -- completions -----------------------------------------------------------------------------


async def test_completion_matches_engine_streamed_and_not(client, reference, tokenizer):
    want = await expected(reference, PROMPT, max_tokens=24)
    prompt_tokens = len(tokenizer.encode(PROMPT).ids)

    got = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0)
    assert got.object == "text_completion" and got.model == MODEL
    assert got.choices[0].text == want.text
    assert got.choices[0].finish_reason == "length"
    assert (got.usage.prompt_tokens, got.usage.completion_tokens, got.usage.total_tokens) == (
        prompt_tokens, 24, prompt_tokens + 24)
    assert got.model_extra["tandem"]["workers"] and got.model_extra["tandem"]["ttft_ms"] > 0

    stream = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stream=True,
                                             stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
    assert chunks[-1].usage.prompt_tokens == prompt_tokens


async def test_completion_with_token_ids_and_default_max_tokens(client, reference, tokenizer):
    ids = tokenizer.encode(PROMPT).ids
    want = await expected(reference, ids, max_tokens=16)
    got = await client.completions.create(model=MODEL, prompt=ids, temperature=0)  # OpenAI's default: 16
    assert got.choices[0].text == want.text
    assert got.usage.completion_tokens == 16


async def test_stop_string(client, reference):
    want = await expected(reference, PROMPT, max_tokens=40)
    stop = want.text[len(want.text) // 2:][:3]  # a string from the middle of the greedy text
    assert len(stop) == 3
    cut = want.text[: want.text.index(stop)]
    got = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0, stop=[stop])
    assert (got.choices[0].text, got.choices[0].finish_reason) == (cut, "stop")
    stream = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0, stop=stop,
                                             stream=True)
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].text for c in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_seed_makes_sampling_repeatable(client):
    async def sample(seed: int) -> str:
        got = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=seed,
                                              extra_body={"top_k": 50})  # top_k: a tandem extension
        return got.choices[0].text

    assert await sample(7) == await sample(7)
    assert len({await sample(s) for s in (1, 2, 3, 4)}) > 1


async def test_logprobs(client, reference, tokenizer):
    want = await expected(reference, PROMPT, max_tokens=8, logprobs=True)
    got = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=1)
    lp = got.choices[0].logprobs
    assert lp.tokens == [tokenizer.decode([t]) for t in want.token_ids]
    assert lp.token_logprobs == pytest.approx(want.logprobs, abs=1e-4)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]

    stream = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=1,
                                             stream=True)
    streamed = [x for c in [c async for c in stream] if c.choices[0].logprobs
                for x in c.choices[0].logprobs.token_logprobs]
    assert streamed == pytest.approx(want.logprobs, abs=1e-4)

    chat = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0,
                                                logprobs=True)
    assert len(chat.choices[0].logprobs.content) == 4
    assert all(t.logprob <= 0 for t in chat.choices[0].logprobs.content)


# -- chat completions ------------------------------------------------------------------------


async def test_chat_completion_matches_engine_streamed_and_not(client, reference, tokenizer):
    ids = chat_prompt_ids(tokenizer, MESSAGES)
    want = await expected(reference, ids, max_tokens=20, stop_token_ids=(tokenizer.token_to_id("<|im_end|>"),))

    got = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20, temperature=0)
    assert got.object == "chat.completion"
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want.text
    assert got.choices[0].finish_reason == want.finish_reason.value
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (len(ids), len(want.token_ids))

    stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=20,
                                                  temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == want.finish_reason.value
    assert chunks[-1].usage.total_tokens == len(ids) + len(want.token_ids)


async def test_chat_template_matches_transformers():
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(DEMO_MODEL_DIR))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}]
    ours = ChatTemplate.from_model_dir(DEMO_MODEL_DIR, TextTokenizer.from_model_dir(DEMO_MODEL_DIR))
    assert ours.render(messages) == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # <|im_end|> is not this model's EOS; it is one (special) token, so it stops by id.
    assert ours.stops.stop == () and ours.stops.stop_token_ids == (2,)


async def test_default_and_refusing_templates(tmp_path):
    assert ChatTemplate.from_model_dir(tmp_path, None).render([{"role": "user", "content": "hi"}]) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert ChatTemplate(DEFAULT_CHATML_TEMPLATE).stops.stop == ("<|im_end|>",)  # no vocabulary: by text
    assert ChatTemplate(DEFAULT_CHATML_TEMPLATE, eos_token="<|im_end|>").stops.stop == ()  # EOS already stops it
    strict = ChatTemplate("{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}ok")
    assert strict.render([{"role": "user", "content": ""}]) == "ok"
    with pytest.raises(ChatTemplateError, match="user first"):
        strict.render([{"role": "system", "content": ""}])
    with pytest.raises(ChatTemplateError):  # the sandbox: no reaching into Python internals
        ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}").render([])


# -- bad input -------------------------------------------------------------------------------

_COMPLETIONS, _CHAT = "/v1/completions", "/v1/chat/completions"


def _bad(name: str, path: str, body: bytes | dict, status: int, param: str | None = None):
    return pytest.param(path, body, status, param, id=name)


_BAD_REQUESTS = [
    _bad("malformed-json", _COMPLETIONS, b'{"model": "dense", "prompt": ', 400),
    _bad("not-an-object", _COMPLETIONS, b'["not", "an", "object"]', 400),
    _bad("nan", _COMPLETIONS, b'{"prompt": "a", "temperature": NaN}', 400),
    _bad("max_tokens-string", _COMPLETIONS, {"prompt": "a", "max_tokens": "ten"}, 400, "max_tokens"),
    _bad("temperature-string", _COMPLETIONS, {"prompt": "a", "temperature": "hot"}, 400, "temperature"),
    _bad("max_tokens-bool", _COMPLETIONS, {"prompt": "a", "max_tokens": True}, 400, "max_tokens"),
    _bad("max_tokens-0", _COMPLETIONS, {"prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    _bad("max_tokens-huge", _COMPLETIONS, {"prompt": "a", "max_tokens": 1 << 40}, 400, "max_tokens"),
    _bad("max_tokens-over-context", _COMPLETIONS, {"prompt": "a", "max_tokens": 5000}, 400),
    _bad("n-2", _COMPLETIONS, {"prompt": "a", "n": 2}, 400, "n"),
    _bad("stop-empty", _COMPLETIONS, {"prompt": "a", "stop": [""]}, 400, "stop"),
    _bad("several-prompts", _COMPLETIONS, {"prompt": ["a", "b"]}, 400, "prompt"),
    _bad("prompt-object", _COMPLETIONS, {"prompt": {"text": "a"}}, 400, "prompt"),
    _bad("no-prompt", _COMPLETIONS, {"max_tokens": 4}, 400, "prompt"),
    _bad("empty-prompt", _COMPLETIONS, {"prompt": ""}, 400),
    _bad("text-over-context", _COMPLETIONS, {"prompt": "x " * 3000}, 400),
    _bad("ids-over-context", _COMPLETIONS, {"prompt": [7] * 2000}, 400),
    # Outside the vocabulary: only the worker knows; refused before any byte of the response is sent.
    _bad("id-outside-vocab", _COMPLETIONS, {"prompt": [1 << 20]}, 400),
    _bad("id-outside-vocab-stream", _COMPLETIONS, {"prompt": [1 << 20], "stream": True}, 400),
    _bad("unknown-model", _COMPLETIONS, {"prompt": "a", "model": "nope"}, 404, "model"),
    _bad("echo", _COMPLETIONS, {"prompt": "a", "echo": True}, 400, "echo"),
    _bad("messages-string", _CHAT, {"messages": "hi"}, 400, "messages"),
    _bad("messages-empty", _CHAT, {"messages": []}, 400, "messages"),
    _bad("bad-role", _CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    _bad("image-part", _CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
         "messages[0].content[0]"),
    _bad("max_completion_tokens-negative", _CHAT, {"messages": MESSAGES, "max_completion_tokens": -1}, 400,
         "max_completion_tokens"),
    _bad("unknown-model-chat-stream", _CHAT, {"messages": MESSAGES, "model": "nope", "stream": True}, 404, "model"),
    _bad("tools", _CHAT, {"messages": MESSAGES, "tools": [{"type": "function"}]}, 400, "tools"),
    _bad("oversized-body", _COMPLETIONS, b"x" * (5 << 20), 413),  # max_body_bytes is 4 MiB
]


@pytest.mark.parametrize("path,body,status,param", _BAD_REQUESTS)
async def test_bad_request_gets_a_json_error(http, path, body, status, param):
    async with http.post(path, data=_payload(body), headers={"Content-Type": "application/json"}) as r:
        assert r.status == status
        assert r.content_type == "application/json"
        error = (await r.json())["error"]
    assert error["message"] and error["type"] and error["param"] == param
    assert "Traceback" not in error["message"]


def _payload(body) -> io.BytesIO:
    return io.BytesIO(body if isinstance(body, bytes) else json.dumps(body).encode())


async def test_unknown_route_and_method_are_json_errors(http):
    async with http.get("/v1/nope") as r:
        assert r.status == 404 and (await r.json())["error"]["message"]
    async with http.get("/v1/completions") as r:
        assert r.status == 405 and (await r.json())["error"]["message"] and "POST" in r.headers["Allow"]


async def test_service_healthy_after_bad_requests(http, client):
    for path, body, _, _ in (p.values for p in _BAD_REQUESTS):
        async with http.post(path, data=_payload(body)) as r:
            await r.read()
    async with http.get("/health") as r:
        assert r.status == 200
    got = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0)
    assert got.usage.completion_tokens == 4


async def test_no_workers_is_503(cluster, http):
    empty = RouterServer(RouterServerConfig(etcd_url=cluster.etcd.url, model_dir=DEMO_MODEL_DIR, cluster="empty",
                                            drain_grace_s=1))
    await empty.start()
    try:
        async with aiohttp.ClientSession(empty.http_url) as session:
            async with session.post("/v1/completions", json={"prompt": "a"}) as r:
                assert r.status == 503 and (await r.json())["error"]["type"] == "service_unavailable_error"
            async with session.get("/health") as r:
                assert r.status == 503
            async with session.get("/v1/models") as r:
                assert (await r.json())["data"] == []
    finally:
        await empty.stop()


# -- client disconnect -----------------------------------------------------------------------


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
async def test_client_disconnect_aborts_the_request(cluster, stream):
    engine_busy = lambda: cluster.worker.aengine.call(lambda e: e.has_unfinished())  # noqa: E731
    cancelled_before = _cancelled_requests(cluster)
    started = time.monotonic()
    if stream:
        async with aiohttp.ClientSession(cluster.http_url) as session:
            response = await _read_some_of_a_long_stream(session)
            assert await engine_busy()
            response.close()  # hang up
    else:  # a bare socket: hang up while the router is still collecting the answer
        url = urllib.parse.urlsplit(cluster.http_url)
        reader, writer = await asyncio.open_connection(url.hostname, url.port)
        body = json.dumps(_long_request(stream=False)).encode()
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (url.netloc.encode(), len(body), body))
        await writer.drain()
        while not await engine_busy():
            await asyncio.sleep(0.02)
        writer.close()
        await writer.wait_closed()

    deadline = time.monotonic() + _ABORT_WAIT_S
    while await engine_busy():
        assert time.monotonic() < deadline, "the worker still runs the request of a client that left"
        await asyncio.sleep(0.05)
    stopped_after_s = time.monotonic() - started
    while _cancelled_requests(cluster) == cancelled_before:
        assert time.monotonic() < deadline, "the router did not count the request as cancelled"
        await asyncio.sleep(0.05)
    # Generating every token would take far longer than it took to stop.
    per_token_s = await _seconds_per_token(cluster)
    assert stopped_after_s < per_token_s * _LONG_STREAM_TOKENS / 2, (stopped_after_s, per_token_s)


def _long_request(stream: bool) -> dict:
    return {"model": MODEL, "prompt": PROMPT, "max_tokens": _LONG_STREAM_TOKENS, "ignore_eos": True,
            "stream": stream}


async def _read_some_of_a_long_stream(session: aiohttp.ClientSession) -> aiohttp.ClientResponse:
    r = await session.post("/v1/completions", json=_long_request(stream=True))
    assert r.status == 200 and r.content_type == "text/event-stream"
    for _ in range(3):
        line = await r.content.readline()
        assert line.startswith(b"data: ") and json.loads(line[6:])["choices"][0]["finish_reason"] is None
        await r.content.readline()  # the blank line ending the event
    return r


def _cancelled_requests(cluster) -> float:
    value = cluster.router.router.metrics.registry.get_sample_value("tandem_requests_total", {"status": "cancelled"})
    return value or 0.0


async def _seconds_per_token(cluster) -> float:
    """Time per token right now, first-token overhead included (a short run through the router)."""
    t0 = time.monotonic()
    async with aiohttp.ClientSession(cluster.http_url) as session:
        async with session.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 32, "ignore_eos": True,
                                                         "temperature": 0}) as r:
            assert (await r.json())["usage"]["completion_tokens"] == 32
    return (time.monotonic() - t0) / 32
