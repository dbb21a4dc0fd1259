"""The OpenAI-compatible HTTP API as its users reach it: the official `openai` Python client against a real
node's API port, with the request served by a two-node cluster.

References: the SDK (gRPC) path of the same cluster, which tests/test_cluster.py checks against the
single-node engine; and the non-streamed answer for the streamed one."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
from checkpoints import deepen
from cluster_nodes import NodeProcess, every_session_taken, free_port, member_names, open_sessions, shards_of, wait_for
from conftest import FIXTURES, TEST_TOKEN
from scripted_model import scripted

from cluster.tokenizer import Tokenizer

MESSAGES = [{"role": "user", "content": "Tell me about the river."}]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return str(deepen(FIXTURES / "llama32", tmp_path_factory.mktemp("model") / "llama32", 6))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    work = tmp_path_factory.mktemp("api")
    front = NodeProcess("front", work, memory=1, mdns=False, api_port=free_port())
    back = NodeProcess("back", work, memory=1, mdns=False, peers=[front.address])
    try:
        front.wait_ready()
        back.wait_ready()
        wait_for(lambda: member_names(front) == {"front", "back"}, 20, "the nodes to find each other")
        yield front, back
    finally:
        front.stop()
        back.stop()


@pytest.fixture(scope="module")
def client(pair) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{pair[0].api_port}/v1", api_key=TEST_TOKEN, max_retries=0)


def test_models_lists_the_registry_and_the_models_in_use(client, model):
    client.completions.create(model=model, prompt="Hello", max_tokens=1, temperature=0)
    ids = {m.id for m in client.models.list()}
    assert {"llama-3.2-1b", "qwen3-0.6b-4bit", "llama32"} <= ids


def test_chat_streamed_equals_not_streamed_and_matches_the_sdk(client, pair, model):
    whole = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=12, temperature=0)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert whole.usage.completion_tokens == 12 and whole.choices[0].finish_reason == "length"
    # beside OpenAI's fields: speed, and each shard's share of a decode step, its layers chained over the model's 6
    shards = whole.model_extra["timing"]["shards"]
    assert shards[0]["layers"][0] == 0 and shards[-1]["layers"][1] == 6
    assert all(a["layers"][1] == b["layers"][0] for a, b in zip(shards, shards[1:], strict=False))
    assert all(0 < s["engine_ms"] < s["wait_ms"] for s in shards) and {s["node"] for s in shards} <= {"front", "back"}
    pieces = []
    usage = None
    for chunk in client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    ):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        if chunk.usage is not None:
            usage = chunk.usage
    assert len(pieces) > 2 and "".join(pieces) == whole.choices[0].message.content
    assert usage is not None and usage.total_tokens == whole.usage.total_tokens
    with pair[0].client() as sdk:  # the gRPC SDK gets the same answer from the same cluster
        chunks = list(sdk.chat(model, MESSAGES, max_tokens=12, temperature=0))
    assert "".join(c.text for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].usage["completion_tokens"] == 12


def test_completions_streamed_equals_not_streamed(client, model):
    whole = client.completions.create(model=model, prompt="The small river", max_tokens=10, temperature=0)
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=model, prompt="The small river", max_tokens=10, temperature=0, stream=True
        )
        if c.choices
    )
    assert whole.object == "text_completion" and streamed == whole.choices[0].text
    assert whole.usage.completion_tokens == 10


def test_logprobs_stop_and_seed(client, model):
    r = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-4)
    c = client.completions.create(model=model, prompt="The small river", max_tokens=3, temperature=0, logprobs=2)
    assert len(c.choices[0].logprobs.token_logprobs) == 3 and len(c.choices[0].logprobs.top_logprobs[0]) == 2
    full = client.completions.create(model=model, prompt="The small river", max_tokens=10, temperature=0)
    text = full.choices[0].text
    cut = text[len(text) // 2 :][:3]
    if cut.strip():
        stopped = client.completions.create(
            model=model, prompt="The small river", max_tokens=10, temperature=0, stop=[cut]
        )
        assert stopped.choices[0].finish_reason == "stop" and cut not in stopped.choices[0].text
    a, b = (
        client.completions.create(model=model, prompt="Hello", max_tokens=8, temperature=0.9, seed=11).choices[0].text
        for _ in range(2)
    )
    assert a == b


def test_errors_use_the_openai_shape_and_status(client, pair, model):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert err.value.status_code == 404 and "no-such-model" in err.value.message
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=MESSAGES, temperature=5)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=[])
    base = f"http://127.0.0.1:{pair[0].api_port}/v1"
    for key in ("", "wrong"):
        with pytest.raises(openai.AuthenticationError) as err:
            openai.OpenAI(base_url=base, api_key=key or "x", max_retries=0).models.list()
        assert err.value.status_code == 401 and "not authorised" in err.value.message
    body = json.dumps({"model": model, "messages": MESSAGES}).encode()
    request = urllib.request.Request(
        f"{base}/chat/completions", data=body, headers={"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as raw:
        urllib.request.urlopen(request, timeout=10)
    assert raw.value.code == 401 and json.loads(raw.value.read())["error"]["code"] == "invalid_api_key"


def test_what_openai_clients_send_beyond_plain_strings(client, pair, model):
    """Content as a list of text parts, the "developer" role, vLLM's sampling extensions and the model lookup work;
    what the node cannot do (several answers, tools for a model whose template has no place for them, images,
    token-id prompts, echo) or out-of-range penalties and biases are a 400 that names them, never ignored.
    References: the same request in its plain form, greedy decoding, and the gRPC SDK."""

    def chat(messages, **kw):
        return client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0, **kw)

    plain = chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about\nthe river."}])
    parts = chat(
        [
            {"role": "developer", "content": "Be brief."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "Tell me about"}, {"type": "text", "text": "the river."}],
            },
        ],
        n=1,  # neutral values of unsupported fields, which clients send by default, are accepted
        presence_penalty=0,
        frequency_penalty=0,
    )
    assert parts.choices[0].message.content == plain.choices[0].message.content
    after_tool_free_turn = chat(
        [*MESSAGES, {"role": "assistant", "content": None}, {"role": "user", "content": "More."}]
    )
    assert after_tool_free_turn.usage.completion_tokens == 6

    def complete(**kw):
        return client.completions.create(model=model, prompt="The small river", max_tokens=8, **kw).choices[0].text

    greedy = complete(temperature=0)
    # top_k=1, or min_p=1, leaves only the most likely id at any temperature: greedy's answer
    assert complete(temperature=1.5, seed=3, extra_body={"top_k": 1}) == greedy
    assert complete(temperature=1.5, seed=3, extra_body={"min_p": 1.0}) == greedy
    assert (
        client.completions.create(model=model, prompt=["The small river"], max_tokens=8, temperature=0).choices[0].text
        == greedy
    )
    penalised = complete(temperature=0, extra_body={"repetition_penalty": 1.8})
    with pair[0].client() as sdk:
        chunks = list(
            sdk.generate(model, "The small river", raw=True, max_tokens=8, temperature=0, repetition_penalty=1.8)
        )
    assert penalised == "".join(c.text for c in chunks)
    # OpenAI's penalties count the answer's tokens on the last shard (another node here): the SDK gets the same
    openai_penalties = {"presence_penalty": 0.7, "frequency_penalty": 1.5}
    counted = complete(temperature=0, logit_bias={"5": 3.0}, **openai_penalties)
    with pair[0].client() as sdk:
        chunks = list(
            sdk.generate(
                model, "The small river", raw=True, max_tokens=8, temperature=0, logit_bias={5: 3.0}, **openai_penalties
            )
        )
    assert counted == "".join(c.text for c in chunks) and counted != greedy

    assert client.models.retrieve("llama-3.2-1b").id == "llama-3.2-1b"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")

    refused = [
        ("n", lambda: chat(MESSAGES, n=2)),
        ("presence_penalty", lambda: chat(MESSAGES, presence_penalty=2.5)),
        ("logit_bias", lambda: chat(MESSAGES, logit_bias={"5": 101})),
        ("logit_bias", lambda: chat(MESSAGES, logit_bias={"999999": 1})),
        ("tools", lambda: chat(MESSAGES, tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])),
        ("response_format", lambda: chat(MESSAGES, response_format={"type": "grammar"})),
        ("image_url", lambda: chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])),
        ("token ids", lambda: client.completions.create(model=model, prompt=[1, 2, 3], max_tokens=2)),
        ("echo", lambda: complete(temperature=0, echo=True)),
    ]
    for name, call in refused:
        with pytest.raises(openai.BadRequestError) as err:
            call()
        assert name in err.value.message and not err.value.message.startswith("Value error"), err.value.message
    assert (
        client.completions.create(model=model, prompt="Hello", max_tokens=1).usage.completion_tokens == 1
    )  # still serving


# The scripted model's answer to every prompt, one token per piece: its reasoning in a <think> block (a thinking
# model's, as Qwen3's are), some text, then two calls in Qwen's form.
REASONING = "The user asks about the weather."
SCRIPT = [
    "<think>",
    "\nThe user asks",
    " about the weather.\n",
    "</think>",
    "\n\n",
    "I will look that up.",
    "\n<tool_call>",
    '\n{"name": "get_weather", "arguments": ',
    '{"city": "Zürich", "unit": "°C"}}',
    "\n</tool_call>",
    '\n<tool_call>\n{"name": "get_time", ',
    '"arguments": {}}\n</tool_call>',
]
ANSWER = "".join(SCRIPT[5:])
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city now",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}}},
        },
    },
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
]


@pytest.fixture(scope="module")
def weather_model(tmp_path_factory) -> str:
    return str(scripted(tmp_path_factory.mktemp("scripted") / "weather", SCRIPT))


def test_tool_calls_are_read_from_the_answer_streamed_or_not(client, pair, weather_model):
    """Tools are offered through the model's chat template and its calls come back as OpenAI's `tool_calls`.
    The model (tests/scripted_model.py) answers every prompt with SCRIPT, split over two nodes, so the reference
    is SCRIPT itself: without tools, what follows its reasoning is the plain answer (ANSWER); with tools, its text
    before the first call is the
    content and its two calls are the tool calls, streamed or not. The turn that sends the results back must
    reach the model as its chat template writes it (checked by the prompt's length in tokens)."""
    model = weather_model
    question = [{"role": "user", "content": "Weather and time in Zürich?"}]

    def chat(messages, **kw):
        return client.chat.completions.create(model=model, messages=messages, max_tokens=40, temperature=0, **kw)

    plain = chat(question)
    assert plain.choices[0].message.content == ANSWER and plain.choices[0].message.tool_calls is None
    unbounded = client.chat.completions.create(model=model, messages=question)  # no max_tokens: up to EOS
    assert unbounded.choices[0].message.content == ANSWER and unbounded.choices[0].finish_reason == "stop"

    answer = chat(question, tools=TOOLS, parallel_tool_calls=True)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "I will look that up.\n"
    calls = choice.message.tool_calls
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Zürich", "unit": "°C"}),
        ("get_time", {}),
    ]
    assert all(c.type == "function" and c.id.startswith("call_") for c in calls) and calls[0].id != calls[1].id

    content, streamed, finish = [], {}, None
    for chunk in client.chat.completions.create(
        model=model, messages=question, tools=TOOLS, max_tokens=40, temperature=0, stream=True
    ):
        delta = chunk.choices[0].delta
        content.append(delta.content or "")
        for call in delta.tool_calls or []:
            streamed[call.index] = (call.function.name, json.loads(call.function.arguments))
        finish = chunk.choices[0].finish_reason or finish
    assert "".join(content) == choice.message.content and not any("<tool" in c for c in content)
    assert [streamed[i] for i in sorted(streamed)] == [
        (c.function.name, json.loads(c.function.arguments)) for c in calls
    ]
    assert finish == "tool_calls"

    # the results go back as the client's SDK sends them: the assistant turn with its calls, one tool message each
    results = [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": calls[0].id, "content": '{"temperature": 4}'},
        {"role": "tool", "tool_call_id": calls[1].id, "content": "10:42"},
    ]
    second = chat([*question, *results], tools=TOOLS)
    expected = [
        *question,
        {
            "role": "assistant",
            "content": "I will look that up.\n",
            "reasoning_content": REASONING,
            "tool_calls": [
                {"function": {"name": "get_weather", "arguments": {"city": "Zürich", "unit": "°C"}}},
                {"function": {"name": "get_time", "arguments": {}}},
            ],
        },
        {"role": "tool", "content": '{"temperature": 4}'},
        {"role": "tool", "content": "10:42"},
    ]
    tokenizer = Tokenizer.from_dir(model)
    assert second.usage.prompt_tokens == len(tokenizer.encode_chat(expected, tools=TOOLS))

    with pair[0].client() as sdk:  # the gRPC SDK reads the same calls, and sends results back the same way
        *_, last = sdk.chat(model, question, tools=TOOLS, max_tokens=40, temperature=0)
        *_, again = sdk.chat(model, [*question, *results], tools=TOOLS, max_tokens=1)
    assert last.finish_reason == "tool_calls" and last.content == choice.message.content
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in last.tool_calls] == [
        (c.function.name, json.loads(c.function.arguments)) for c in calls
    ]
    assert again.usage["prompt_tokens"] == second.usage.prompt_tokens

    # vLLM's chat_template_kwargs reach the template (Qwen3 switches its thinking off this way)
    quiet = client.chat.completions.create(
        model=model, messages=question, max_tokens=1, extra_body={"chat_template_kwargs": {"enable_thinking": False}}
    )
    assert quiet.usage.prompt_tokens == len(tokenizer.encode_chat(question, enable_thinking=False))
    assert quiet.usage.prompt_tokens > plain.usage.prompt_tokens
    with pair[0].client() as sdk:  # the SDK's template_kwargs, and the CLI's --no-thinking, do the same
        *_, last = sdk.chat(model, question, template_kwargs={"enable_thinking": False}, max_tokens=1)
    assert last.usage["prompt_tokens"] == quiet.usage.prompt_tokens
    cli = [sys.executable, "-m", "cluster.cli", "run", model, question[0]["content"], "--node", pair[0].address]
    p = subprocess.run([*cli, "--no-thinking", "--json", "--max-tokens", "1"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.splitlines()[-1])["usage"]["prompt_tokens"] == quiet.usage.prompt_tokens
    p = subprocess.run([*cli, "--json", "--max-tokens", "40"], capture_output=True, text=True)
    summary = json.loads(p.stdout.splitlines()[-1])  # run --json parts the answer as the API does
    assert (summary["reasoning"], summary["content"], summary["text"]) == (REASONING, ANSWER, "".join(SCRIPT))

    # "none": the model is not told of the tools and its answer is text
    unoffered = chat(question, tools=TOOLS, tool_choice="none")
    assert unoffered.choices[0].message.content == ANSWER
    assert unoffered.usage.prompt_tokens == plain.usage.prompt_tokens
    for bad in ({"type": "function", "function": {"name": "no_such_tool"}}, "sometimes"):
        with pytest.raises(openai.BadRequestError) as err:
            chat(question, tools=TOOLS, tool_choice=bad)
        assert err.value.body["param"] == "tool_choice"
    with pytest.raises(openai.BadRequestError) as err:
        chat(
            [
                *question,
                {
                    **results[0],
                    "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{x"}}],
                },
            ]
        )
    assert "arguments" in err.value.message


# Arguments the scripted model can only fill by the constraint: enums, so that the answer is finite.
FORCED_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"enum": ["Zürich", "Oslo"]}, "metric": {"type": "boolean"}},
                "required": ["city", "metric"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {
                "type": "object",
                "properties": {"zone": {"enum": ["CET", "UTC"]}},
                "required": ["zone"],
                "additionalProperties": False,
            },
        },
    },
]


def test_forced_tool_calls_and_json_answers_follow_their_schema(client, pair, model, weather_model):
    """tool_choice "required" or a named function, and response_format json_object / json_schema, hold the answer
    to a JSON schema by constrained decoding, on a model split over two nodes. The models would not write such
    JSON by themselves (the scripted one always answers SCRIPT; the other is random), so the reference is the
    schema: the answer must parse and follow it."""
    question = [{"role": "user", "content": "Weather and time in Zürich?"}]

    def chat(model, **kw):
        return client.chat.completions.create(model=model, messages=question, max_tokens=120, temperature=0, **kw)

    named = chat(weather_model, tools=FORCED_TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}})
    (call,) = named.choices[0].message.tool_calls
    assert named.choices[0].finish_reason == "tool_calls" and not named.choices[0].message.content
    assert call.function.name == "get_time" and json.loads(call.function.arguments)["zone"] in ("CET", "UTC")
    with pair[0].client() as sdk:  # the SDK forces the same call
        *_, last = sdk.chat(
            weather_model,
            question,
            tools=FORCED_TOOLS,
            tool_choice={"type": "function", "function": {"name": "get_time"}},
            max_tokens=120,
            temperature=0,
        )
    assert [c["function"]["arguments"] for c in last.tool_calls] == [call.function.arguments]

    required = chat(weather_model, tools=FORCED_TOOLS, tool_choice="required", parallel_tool_calls=False)
    (call,) = required.choices[0].message.tool_calls
    arguments = json.loads(call.function.arguments)
    assert call.function.name in ("get_weather", "get_time")
    assert set(arguments) == ({"city", "metric"} if call.function.name == "get_weather" else {"zone"})

    schema = {
        "type": "object",
        "properties": {"river": {"enum": ["Rhine", "Danube"]}, "navigable": {"type": "boolean"}},
        "required": ["river", "navigable"],
        "additionalProperties": False,
    }
    answer = chat(model, response_format={"type": "json_schema", "json_schema": {"name": "river", "schema": schema}})
    value = json.loads(answer.choices[0].message.content)
    assert set(value) == {"river", "navigable"} and value["river"] in ("Rhine", "Danube")
    assert isinstance(value["navigable"], bool) and answer.choices[0].finish_reason == "stop"
    free = chat(model)
    assert not free.choices[0].message.content.startswith("{")  # the model's own answer is no JSON
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in chat(
            model, response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": schema}}, stream=True
        )
        if c.choices
    )
    assert streamed == answer.choices[0].message.content
    with pair[0].client() as sdk:  # the gRPC SDK takes the schema too, with the same answer
        chunks = list(sdk.chat(model, question, json_schema=schema, max_tokens=120, temperature=0))
    assert "".join(c.text for c in chunks) == answer.choices[0].message.content

    with pytest.raises(openai.BadRequestError) as err:
        chat(model, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}})
    assert "JSON schema" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        chat(weather_model, tools=FORCED_TOOLS, tool_choice="required", response_format={"type": "json_object"})
    assert "response_format" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        chat(weather_model, tool_choice="required")  # a call, but no tools to call
    assert err.value.body["param"] == "tool_choice"


def reasoning_of(message) -> str | None:
    # not a field of the openai client's types: it keeps unknown fields as extras
    assert message.model_extra.get("reasoning") == message.model_extra.get("reasoning_content")
    return message.model_extra.get("reasoning_content")


def test_a_thinking_models_reasoning_comes_apart_from_its_answer(client, pair, weather_model):
    """A thinking model's <think> block is its reasoning (`reasoning_content`), apart from the content and the tool
    calls, streamed or not, through the API and the SDK. The model (tests/scripted_model.py) answers every prompt
    with SCRIPT, split over two nodes, so the reference is SCRIPT itself."""
    model, question = weather_model, [{"role": "user", "content": "Weather in Zürich?"}]

    def chat(messages=question, max_tokens=40, **kw):
        return client.chat.completions.create(
            model=model, messages=messages, max_tokens=max_tokens, temperature=0, **kw
        )

    answer = chat(tools=TOOLS)
    message = answer.choices[0].message
    assert reasoning_of(message) == REASONING and message.content == "I will look that up.\n"
    assert [c.function.name for c in message.tool_calls] == ["get_weather", "get_time"]
    assert answer.choices[0].finish_reason == "tool_calls"

    reasoning, content, calls = [], [], []
    for chunk in client.chat.completions.create(
        model=model, messages=question, tools=TOOLS, max_tokens=40, temperature=0, stream=True
    ):
        delta = chunk.choices[0].delta
        reasoning.append(reasoning_of(delta) or "")
        content.append(delta.content or "")
        calls += [c.function.name for c in delta.tool_calls or []]
    assert "".join(reasoning) == REASONING and "".join(content) == message.content
    assert calls == ["get_weather", "get_time"]
    assert sum(bool(r) for r in reasoning) >= 2  # the reasoning streams as it comes, not at the end
    assert not any("think>" in c for c in content + reasoning)

    with pair[0].client() as sdk:  # the SDK's final chunk parts the answer the same way; its stream is the model's
        chunks = list(sdk.chat(model, question, tools=TOOLS, max_tokens=40, temperature=0))
    assert "".join(c.text for c in chunks) == "".join(SCRIPT)
    assert chunks[-1].reasoning == REASONING and chunks[-1].content == message.content

    # the prompt opened the block (as DeepSeek-R1's templates do): the answer starts inside the reasoning
    opened = chat(extra_body={"chat_template_kwargs": {"open_thinking": True}})
    assert reasoning_of(opened.choices[0].message) == REASONING
    assert opened.choices[0].message.content == ANSWER
    cut = chat(max_tokens=2, extra_body={"chat_template_kwargs": {"open_thinking": True}})
    assert reasoning_of(cut.choices[0].message) == REASONING and cut.choices[0].message.content == ""
    assert cut.choices[0].finish_reason == "length"
    # held to a schema, it thinks freely first, then its answer follows the schema (left to itself after </think>,
    # the scripted model would write SCRIPT's text: the JSON is the constraint's doing)
    schema = {
        "type": "object",
        "properties": {"city": {"enum": ["Zürich", "Oslo"]}},
        "required": ["city"],
        "additionalProperties": False,
    }
    held = chat(response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}})
    assert reasoning_of(held.choices[0].message) == REASONING
    assert json.loads(held.choices[0].message.content)["city"] in ("Zürich", "Oslo")
    plain = client.completions.create(model=model, prompt="Hi", max_tokens=3, temperature=0)  # text completions
    assert not plain.choices[0].model_extra.get("reasoning_content")

    # the reasoning goes back with its turn, into the template's <think> block (checked by the prompt's length),
    # under either name
    tokenizer = Tokenizer.from_dir(model)
    turn = {"role": "assistant", "content": "It is 4."}
    for name in ("reasoning_content", "reasoning"):
        history = [*question, {**turn, name: "2+2"}, {"role": "user", "content": "And 3+3?"}]
        again = chat(history, max_tokens=1)
        expected = [*question, {**turn, "reasoning_content": "2+2"}, history[2]]
        assert again.usage.prompt_tokens == len(tokenizer.encode_chat(expected))
        assert again.usage.prompt_tokens > len(tokenizer.encode_chat([*question, turn, history[2]]))


def test_concurrent_requests_each_get_their_own_answer(client, model):
    prompts = ["The small river", "In the morning", "Numbers like"]
    alone = {
        p: client.completions.create(model=model, prompt=p, max_tokens=8, temperature=0).choices[0].text
        for p in prompts
    }
    together: dict[str, str] = {}

    def ask(p: str) -> None:
        together[p] = client.completions.create(model=model, prompt=p, max_tokens=8, temperature=0).choices[0].text

    threads = [threading.Thread(target=ask, args=(p,)) for p in prompts * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert together == alone


def test_a_client_that_disconnects_ends_its_session(client, pair, model):
    def open_sessions() -> int:
        with pair[0].client() as sdk:
            return sum(s["sessions"] for n in sdk.nodes() for s in n.shards)

    stream = client.completions.create(model=model, prompt="Hello", max_tokens=500, temperature=0, stream=True)
    next(iter(stream))
    assert open_sessions() == 2
    stream.close()
    wait_for(lambda: open_sessions() == 0, 10, "the session to end on both nodes")


def test_a_busy_shard_is_a_503_with_code_busy():
    from cluster.api.server import api_error
    from cluster.host import ShardBusyError

    error = api_error(ShardBusyError("busy: all 8 sessions of m layers [0, 4) on this node stayed in use for 300 s"))
    assert (error.status, error.code) == (503, "busy") and str(error).startswith("busy: ")


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_hangs_up_while_its_request_waits_frees_the_sessions_it_opened(pair, client, model, stream):
    """Every session of the model's last shard is taken, so a request opens sessions on the shards before it and
    waits. The HTTP client gives up after 3 s and closes its connection: the node ends the wait and those
    sessions at once, while the places stay taken (tests/test_cluster.py does the same through the SDK)."""
    client.completions.create(model=model, prompt="Hello", max_tokens=1, temperature=0)  # placed
    front = pair[0]
    node, last = shards_of(pair, Path(model).name)[-1]
    impatient = client.with_options(timeout=3)
    with every_session_taken(node, last):
        failure: list[BaseException] = []

        def hang_up() -> None:
            try:
                response = impatient.completions.create(
                    model=model, prompt="Hello", max_tokens=4, temperature=0, stream=stream
                )
                list(response) if stream else None
            except openai.APITimeoutError as e:
                failure.append(e)

        request = threading.Thread(target=hang_up)
        request.start()
        wait_for(lambda: open_sessions(front) > last.max_sessions, 10, "sessions on the shards before the full one")
        request.join(30)
        assert failure, "the request did not time out"
        wait_for(lambda: open_sessions(front) == last.max_sessions, 10, "the sessions of the request to end")
    wait_for(lambda: open_sessions(front) == 0, 10, "the held sessions to end")
