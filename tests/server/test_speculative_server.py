"""`slimserve serve --speculative suffix` through the openai client: the same answers as plain
decoding, streamed or not; the request-level opt-out; acceptance counters in /metrics."""

import httpx
import pytest

from slimserve import SamplingParams

from .conftest import ServerProcess, metric

COPY = [
    {
        "role": "user",
        "content": "Repeat this list exactly, one item per line:\n"
        + "\n".join(f"item {i}: the {w} box" for i, w in enumerate("red green blue gold".split())),
    }
]


@pytest.fixture(scope="module")
def spec_server():
    srv = ServerProcess("--speculative", "suffix", "--served-model-name", "m")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def spec_client(spec_server):
    import openai

    return openai.OpenAI(base_url=spec_server.url + "/v1", api_key="none", max_retries=0)


def _plain(llm, messages, max_tokens):
    text = llm.tokenizer.apply_chat_template(messages)
    return llm.generate(text, SamplingParams(max_tokens=max_tokens, temperature=0.0))[0]


def test_answers_equal_plain_decoding(spec_client, llm):
    messages = COPY
    ref = _plain(llm, messages, 96).outputs[0]
    r = spec_client.chat.completions.create(
        model="m", messages=messages, max_tokens=96, temperature=0
    )
    assert r.choices[0].message.content == ref.text
    assert r.usage.completion_tokens == len(ref.token_ids)
    stream = spec_client.chat.completions.create(
        model="m", messages=messages, max_tokens=96, temperature=0, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == ref.text


def test_metrics_count_drafts_and_opt_out_skips_them(spec_server, spec_client):
    with httpx.Client(base_url=spec_server.url, timeout=60) as http:
        spec_client.chat.completions.create(model="m", messages=COPY, max_tokens=64, temperature=0)
        drafted = metric(http, "slimserve_spec_decode_draft_tokens_total")
        accepted = metric(http, "slimserve_spec_decode_accepted_tokens_total")
        assert 0 < accepted <= drafted
        assert metric(http, "slimserve_spec_decode_mean_accepted_length") > 1.0
        r = spec_client.chat.completions.create(
            model="m", messages=COPY, max_tokens=64, temperature=0,
            extra_body={"speculative": False},
        )  # fmt: skip
        assert r.choices[0].message.content
        assert metric(http, "slimserve_spec_decode_draft_tokens_total") == drafted
        bad = http.post(
            "/v1/chat/completions",
            json={"model": "m", "messages": COPY, "speculative": "sometimes"},
        )
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "speculative"
