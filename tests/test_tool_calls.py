"""Reading tool calls out of a model's answer (cluster/tool_calls.py), for each format a chat template can teach.

Reference: the calls written into each answer here, and the answer itself for text that is not a call. Every
answer is fed whole, one character at a time, and in uneven pieces: the split must not depend on where tokens
happen to end."""

from __future__ import annotations

import json

import pytest

from cluster.tool_calls import HERMES, LLAMA3_JSON, MISTRAL, ToolCallFormat, format_for


def _pieces(text: str) -> list[list[str]]:
    return [[text], list(text), [text[i : i + 3] for i in range(0, len(text), 3)]]


def split(fmt: ToolCallFormat, text: str) -> tuple[str, list[tuple[str, dict]]]:
    """The text a client is shown and the calls, the same for every way of cutting `text` into pieces."""
    results = set()
    for pieces in _pieces(text):
        splitter = fmt.splitter()
        shown = "".join(splitter.push(p) for p in pieces)
        rest, calls = splitter.finish()
        results.add((shown + rest, json.dumps([(c.name, json.loads(c.arguments)) for c in calls])))
    assert len(results) == 1, results
    shown, calls = results.pop()
    return shown, [tuple(c) for c in json.loads(calls)]


def test_the_format_comes_from_the_chat_template():
    assert format_for("{{- '<tool_call>\\n' }}{{ tool_call | tojson }}") is HERMES
    assert format_for("{{- '[TOOL_CALLS][' }}") is MISTRAL
    llama32 = '<|start_header_id|>user<|end_header_id|>Respond in the format {"name": function name, "parameters": ...}'
    assert format_for(llama32) is LLAMA3_JSON
    assert format_for("{{ '<|python_tag|>' }}") is LLAMA3_JSON
    assert format_for("{% for tool in tools %}{{ tool.function.name }}{% endfor %}") is None


def test_hermes_text_then_two_calls():
    answer = (
        "Let me check both.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Zürich", "unit": "°C"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    )
    shown, calls = split(HERMES, answer)
    assert shown == "Let me check both.\n"
    assert calls == [("get_weather", {"city": "Zürich", "unit": "°C"}), ("get_time", {})]


def test_hermes_text_streams_before_the_marker_and_a_near_marker_is_let_go():
    splitter = HERMES.splitter()
    assert splitter.push("Use <tool") == "Use "  # could be the start of <tool_call>: held
    assert splitter.push("s> wisely") == "<tools> wisely"  # it was not
    assert splitter.push(" <tool_") == " "
    assert splitter.push('call>{"name": "f", "arguments": {"x": 1}}') == ""
    assert splitter.finish()[0] == ""


def test_hermes_last_call_may_end_without_its_closing_tag():
    shown, calls = split(HERMES, '<tool_call>\n{"name": "search", "arguments": {"q": "rivers"}}\n')
    assert (shown, calls) == ("", [("search", {"q": "rivers"})])


@pytest.mark.parametrize(
    "answer",
    [
        '<tool_call>\n{"name": "search", "arguments": {"q": "riv',  # cut off by max_tokens
        '<tool_call>\n{"arguments": {}}\n</tool_call>',  # no name
        "I would use <tool_call> here, but no.",
    ],
)
def test_what_does_not_parse_as_calls_stays_text(answer):
    assert split(HERMES, answer) == (answer, [])


def test_plain_answers_are_untouched():
    for fmt in (HERMES, LLAMA3_JSON, MISTRAL):
        assert split(fmt, "  The river is 6 km long.\n") == ("  The river is 6 km long.\n", [])


def test_llama3_json_calls():
    one = '{"name": "get_weather", "parameters": {"city": "Oslo"}}'
    assert split(LLAMA3_JSON, one) == ("", [("get_weather", {"city": "Oslo"})])
    assert split(LLAMA3_JSON, "<|python_tag|>" + one) == ("", [("get_weather", {"city": "Oslo"})])
    two = one + '; {"name": "get_time", "parameters": {"zone": "CET"}}'
    assert split(LLAMA3_JSON, "\n" + two)[1] == [("get_weather", {"city": "Oslo"}), ("get_time", {"zone": "CET"})]


def test_llama3_json_that_is_no_call_is_the_answer():
    answer = '{"river": "Rhine", "length_km": 1233}'
    assert split(LLAMA3_JSON, answer) == (answer, [])
    # a call only counts at the start of the answer
    later = 'Call this: {"name": "f", "parameters": {}}'
    assert split(LLAMA3_JSON, later) == (later, [])
    splitter = LLAMA3_JSON.splitter()
    assert splitter.push(" ") == "" and splitter.push(" Sure") == "  Sure"  # text shows once it is clearly text


def test_mistral_v3_list_and_v11_calls():
    v3 = '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Nice"}}, {"name": "noop", "arguments": {}}]'
    assert split(MISTRAL, v3) == ("", [("get_weather", {"city": "Nice"}), ("noop", {})])
    v11 = '[TOOL_CALLS]get_weather[ARGS]{"city": "Nice"}[TOOL_CALLS]noop[CALL_ID]a1b2c3d4e[ARGS]{}'
    assert split(MISTRAL, v11) == ("", [("get_weather", {"city": "Nice"}), ("noop", {})])
    broken = "[TOOL_CALLS]get_weather{"
    assert split(MISTRAL, broken) == (broken, [])


def test_call_ids_suit_the_model():
    splitter = MISTRAL.splitter()
    splitter.push('[TOOL_CALLS][{"name": "f", "arguments": {"a": "b"}}]')
    _, (call,) = splitter.finish()
    assert len(call.id) == 9 and call.id.isalnum()
    assert call.to_openai(0) == {
        "index": 0,
        "id": call.id,
        "type": "function",
        "function": {"name": "f", "arguments": '{"a": "b"}'},
    }
    # another server's ids are mapped to 9 letters or digits, the same way each time, for Mistral's templates
    mapped = MISTRAL.history_id("call_abc123def456")
    assert len(mapped) == 9 and mapped.isalnum() and mapped == MISTRAL.history_id("call_abc123def456")
    assert MISTRAL.history_id("a1b2c3d4e") == "a1b2c3d4e" and HERMES.history_id("call_x") == "call_x"
    assert HERMES.new_id().startswith("call_") and HERMES.new_id() != HERMES.new_id()


def test_arguments_written_as_a_string_are_kept():
    splitter = HERMES.splitter()
    splitter.push('<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>')
    _, (call,) = splitter.finish()
    assert call.arguments == '{"a": 1}'


TOOLS = [
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "noop"}},
]
HERMES_TEMPLATE = "{% for t in tools %}{{ t | tojson }}{% endfor %} <tool_call>"


def test_what_a_requests_tools_make_of_the_answer():
    from cluster.tool_calls import ToolError, template_calls, tool_use

    plain = tool_use(None, None)
    assert (plain.offered, plain.reader, plain.json_schema) == (None, None, None)
    auto = tool_use(HERMES_TEMPLATE, TOOLS)
    assert auto.offered == TOOLS and auto.reader is HERMES and auto.json_schema is None
    assert tool_use(HERMES_TEMPLATE, TOOLS, "none").offered is None  # the model is not told of them
    for template, message in ((None, "no place for tools"), ("{{ tools }}", "format")):
        with pytest.raises(ToolError, match=message) as err:
            tool_use(template, TOOLS)
        assert err.value.param == "tools"
    for kw in ({"name": "no_such_tool"}, {"choice": "required", "tools": None}, {"choice": "sometimes"}):
        with pytest.raises(ToolError) as err:
            tool_use(HERMES_TEMPLATE, **{"tools": TOOLS, **kw})
        assert err.value.param == "tool_choice"

    # forced calls: the answer is the calls' JSON, held to a schema, read back whatever the model's own form
    named = tool_use("{{ tools }}", TOOLS, name="get_time")
    assert named.json_schema == {"type": "object"} and split(named.reader, '{"zone": "CET"}')[1] == [
        ("get_time", {"zone": "CET"})
    ]
    required = tool_use(HERMES_TEMPLATE, TOOLS, "required", parallel=False)
    assert required.json_schema["maxItems"] == 1 and len(required.json_schema["items"]["anyOf"]) == 2
    answer = '[{"name": "noop", "parameters": {}}]'
    assert split(required.reader, answer) == ("", [("noop", {})])
    assert split(required.reader, '[{"name": "noop"') == ('[{"name": "noop"', [])  # cut off: text

    assert template_calls([("c1", "f", '{"a": 1}')], MISTRAL.history_id)[0]["function"]["arguments"] == {"a": 1}
    with pytest.raises(ToolError, match="not JSON"):
        template_calls([("c1", "f", "{a")], HERMES.history_id)
