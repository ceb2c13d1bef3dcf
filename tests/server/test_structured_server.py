"""Structured outputs through the official openai client: response_format (including the
client's own `parse` with a pydantic model), vLLM's structured_outputs, streaming."""

import json
import re

import jsonschema
import openai
import pytest
from pydantic import BaseModel

MODEL = "smollm2"
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 30},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Describe a person as JSON."}]


def test_strict_json_schema_validates_streamed_and_not(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON,
                                                   "strict": True}}  # fmt: skip
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=80, temperature=0, response_format=fmt
    )
    text = r.choices[0].message.content
    jsonschema.validate(json.loads(text), PERSON)
    assert r.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=80, temperature=0, response_format=fmt, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text


def test_the_clients_parse_with_a_pydantic_model(client):
    class Weather(BaseModel):
        city: str
        celsius: int
        raining: bool

    r = client.chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": "Weather in Oslo?"}],
        max_tokens=60, temperature=0, response_format=Weather,
    )  # fmt: skip
    parsed = r.choices[0].message.parsed
    assert isinstance(parsed, Weather)


def test_json_object_and_vllm_fields(client):
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=80, temperature=0,
        response_format={"type": "json_object"},
    )  # fmt: skip
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Give a time."}], max_tokens=20,
        temperature=0, extra_body={"structured_outputs": {"regex": r"[0-2][0-9]:[0-5][0-9]"}},
    )  # fmt: skip
    assert re.fullmatch(r"[0-2][0-9]:[0-5][0-9]", r.choices[0].message.content)
    r = client.completions.create(
        model=MODEL, prompt="Is the sky blue? Answer:", max_tokens=5, temperature=0,
        extra_body={"guided_choice": ["yes", "no"]},
    )  # fmt: skip
    assert r.choices[0].text in ("yes", "no")


def test_an_invalid_schema_is_a_400_naming_the_field(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL, messages=ASK, max_tokens=8,
            response_format={"type": "json_schema", "json_schema": {
                "name": "x", "schema": {"type": "object", "properties": {"a": {"type": 7}}}}},
        )  # fmt: skip
    assert e.value.body["param"] == "response_format"
    # The server goes on serving.
    ok = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4)
    assert ok.choices[0].message.content is not None
