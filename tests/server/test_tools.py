"""Tool calling through the official openai client: named and required calls always parse with
arguments valid under their schema, streamed and not; "none" answers in text; tool results
go back in and the conversation carries on."""

import json

import jsonschema
import openai
import pytest

from slimserve.server.tools import StreamParser, ToolPlan

MODEL = "smollm2"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 30},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Current time in a time zone",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 30}},
            "required": ["zone"],
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Oslo?"}]


def _valid(call, tool):
    assert call.type == "function" and call.id
    assert call.function.name == tool["function"]["name"]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


def test_named_tool_choice_gives_a_valid_call(client):
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER, TIME], max_tokens=80, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )  # fmt: skip
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls and choice.message.content is None
    for call in choice.message.tool_calls:
        _valid(call, WEATHER)


def test_required_streams_tool_call_deltas(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER, TIME], max_tokens=120, temperature=0,
        tool_choice="required", parallel_tool_calls=False, stream=True,
    )  # fmt: skip
    calls, reasons, content = {}, [], ""
    for chunk in stream:
        if not chunk.choices:
            continue
        c = chunk.choices[0]
        content += c.delta.content or ""
        for d in c.delta.tool_calls or []:
            calls.setdefault(d.index, d)
        if c.finish_reason:
            reasons.append(c.finish_reason)
    assert reasons == ["tool_calls"] and len(calls) == 1 and not content.strip()
    call = calls[0]
    tool = WEATHER if call.function.name == "get_weather" else TIME
    _valid(call, tool)


def test_tool_choice_none_answers_in_text(client):
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="none", max_tokens=24,
        temperature=0,
    )  # fmt: skip
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason in ("stop", "length")


def test_a_tool_result_goes_back_in(client):
    first = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=80,
        temperature=0,
    )  # fmt: skip
    call = first.choices[0].message.tool_calls[0]
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 3, "sky": "snow"}'},
    ]
    r = client.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER], max_tokens=40, temperature=0
    )
    assert r.choices[0].message.content or r.choices[0].message.tool_calls


@pytest.mark.parametrize("kwargs, param", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": [WEATHER]},
     "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
])  # fmt: skip
def test_bad_tool_requests_are_400s(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8, **kwargs)
    assert e.value.body["param"] == param


def test_the_stream_parser_holds_back_only_what_may_be_a_call():
    plan = ToolPlan([WEATHER], "auto", True)
    p = StreamParser(plan)
    text = 'Sure. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    out, calls = "", []
    for ch in text:  # one character at a time
        c, k = p.feed(ch)
        out, calls = out + c, calls + k
    c, k = p.feed("", final=True)
    out += c
    assert out == "Sure. " and len(calls) == 1
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo"}
    p = StreamParser(plan)
    c1, _ = p.feed("a <tool")
    c2, _ = p.feed("bar> b", final=True)
    assert c1 + c2 == "a <toolbar> b"
