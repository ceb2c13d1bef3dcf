"""OpenAI-compatible API: answers equal LLM.generate; streaming, logprobs, echo, metrics
(test_api_errors.py: bad input, authentication, disconnects)."""

import asyncio
import json

import pytest

from slimserve import SamplingParams

from .conftest import API_KEY, MODEL, QUESTION, metric


def reference(llm, messages=None, prompt=None, max_tokens=24):
    text = prompt if prompt is not None else llm.tokenizer.apply_chat_template(messages)
    return llm.generate(text, SamplingParams(max_tokens=max_tokens, temperature=0.0))[0]


def test_chat_equals_llm_generate(client, llm):
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=24, temperature=0)
    ref = reference(llm, QUESTION)
    assert r.choices[0].message.content == ref.outputs[0].text
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == ref.outputs[0].finish_reason
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert r.usage.completion_tokens == len(ref.outputs[0].token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completion_equals_llm_generate(client, llm):
    prompt = "The three primary colours are"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0)
    assert r.choices[0].text == reference(llm, prompt=prompt, max_tokens=20).outputs[0].text
    ids = llm.tokenizer.encode(prompt)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=20, temperature=0)
    assert by_ids.choices[0].text == r.choices[0].text
    two = client.completions.create(
        model=MODEL, prompt=[prompt, "Hello"], max_tokens=5, temperature=0
    )
    assert [c.index for c in two.choices] == [0, 1]
    assert two.choices[1].text == reference(llm, prompt="Hello", max_tokens=5).outputs[0].text


def test_stream_equals_non_stream_with_usage(client):
    kwargs = dict(model=MODEL, messages=QUESTION, max_tokens=32, temperature=0)
    full = client.chat.completions.create(**kwargs)
    chunks = list(
        client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    stream = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=16, temperature=0, stream=True
    )
    streamed = "".join(c.choices[0].text for c in stream)
    assert (
        streamed
        == client.completions.create(
            model=MODEL, prompt="Once upon a time", max_tokens=16, temperature=0
        )
        .choices[0]
        .text
    )


def test_sse_wire_format_ends_with_done(http):
    with http.stream(
        "POST",
        "/v1/chat/completions",
        json={"model": MODEL, "messages": QUESTION, "max_tokens": 4, "stream": True},
    ) as r:
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][6:])["object"] == "chat.completion.chunk"


def test_sampling_fields_and_n(client):
    kwargs = dict(
        model=MODEL,
        messages=QUESTION,
        max_completion_tokens=8,
        temperature=0.9,
        top_p=0.9,
        seed=3,
        n=2,
        stop=["\n"],
        presence_penalty=0.5,
        frequency_penalty=0.5,
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "ignore_eos": True},
    )
    r = client.chat.completions.create(**kwargs)
    assert [c.index for c in r.choices] == [0, 1]
    again = client.chat.completions.create(**kwargs)  # same seed, same choices
    assert [c.message.content for c in r.choices] == [c.message.content for c in again.choices]


def test_logprobs(client):
    r = client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.logprob - 1e-6  # greedy takes the top one
    c = client.completions.create(model=MODEL, prompt="Hi", max_tokens=3, temperature=0, logprobs=2)
    assert len(c.choices[0].logprobs.token_logprobs) == 3


def test_completion_echo_scores_the_prompt(client, llm):
    """echo + logprobs, as evaluation harnesses score a text: the prompt's tokens come back with
    the log-probability of each given the ones before; a greedy continuation scored as part of
    a prompt gets the logprobs it was drawn with."""
    head = "The capital of France is"
    drawn = client.completions.create(
        model=MODEL, prompt=head, max_tokens=6, temperature=0, logprobs=2
    ).choices[0]
    text = head + drawn.text
    ids = llm.tokenizer.encode(text)
    r = client.completions.create(
        model=MODEL, prompt=text, max_tokens=0, echo=True, logprobs=2, temperature=0
    )
    c = r.choices[0]
    assert c.text == text and c.finish_reason == "length"
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(ids)
    lp = c.logprobs
    assert len(lp.tokens) == len(ids) and "".join(lp.tokens) == text
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset[:2] == [0, len(lp.tokens[0])]
    n = len(drawn.logprobs.tokens)
    assert lp.tokens[-n:] == drawn.logprobs.tokens  # the continuation tokenizes the same
    for got, want in zip(lp.token_logprobs[-n:], drawn.logprobs.token_logprobs):
        assert abs(got - want) <= 0.02
    for p in range(1, len(ids)):
        assert lp.token_logprobs[p] <= 0 and len(lp.top_logprobs[p]) == 2
        assert max(lp.top_logprobs[p].values()) >= lp.token_logprobs[p] - 1e-6
    for tok, top in zip(lp.tokens[-n:], lp.top_logprobs[-n:]):  # greedy: each was the likeliest
        assert max(top, key=top.get) == tok

    # Echo with a completion: prompt then completion, text and logprobs, streamed or not, the
    # prompt given as text or as token ids.
    plain = client.completions.create(model=MODEL, prompt=head, max_tokens=6, temperature=0)
    both = client.completions.create(
        model=MODEL, prompt=llm.tokenizer.encode(head), max_tokens=6, temperature=0, echo=True,
        logprobs=1,
    ).choices[0]  # fmt: skip
    assert both.text == head + plain.choices[0].text
    assert len(both.logprobs.tokens) == len(llm.tokenizer.encode(head)) + 6
    assert both.logprobs.text_offset[-6] == len(head)
    chunks = list(client.completions.create(
        model=MODEL, prompt=head, max_tokens=6, temperature=0, echo=True, stream=True
    ))  # fmt: skip
    assert chunks[0].choices[0].text.startswith(head)
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == both.text
    unscored = client.completions.create(model=MODEL, prompt=head, max_tokens=0, echo=True)
    assert unscored.choices[0].text == head and unscored.choices[0].logprobs is None
    two = client.completions.create(
        model=MODEL, prompt=[ids[:3], ids], max_tokens=0, echo=True, n=2
    )
    texts = [llm.tokenizer.decode(ids[:3])] * 2 + [text] * 2
    assert [c.text for c in sorted(two.choices, key=lambda c: c.index)] == texts


def test_models_endpoint(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_concurrent_streaming_clients(aclient, client):
    """32 streams at once give each prompt's answer alone: greedy output does not depend on the
    batch (tests/model/test_batch_invariance.py)."""
    prompts = [[{"role": "user", "content": f"Count from {i} to {i + 5}."}] for i in range(4)]
    expected = [
        client.chat.completions.create(model=MODEL, messages=p, max_tokens=24, temperature=0)
        .choices[0]
        .message.content
        for p in prompts
    ]

    async def one(i):
        stream = await aclient.chat.completions.create(
            model=MODEL, messages=prompts[i % 4], max_tokens=24, temperature=0, stream=True
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def all_of_them():
        return await asyncio.gather(*(one(i) for i in range(32)))

    texts = asyncio.run(all_of_them())
    assert texts == [expected[i % 4] for i in range(32)]


def test_metrics_parse_and_move(http, client):
    before = metric(http, "slimserve_generation_tokens_total")
    hist = metric(http, "slimserve_time_to_first_token_seconds_count")
    client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=5, temperature=0)
    assert metric(http, "slimserve_generation_tokens_total") > before
    assert metric(http, "slimserve_time_to_first_token_seconds_count") == hist + 1
    assert metric(http, "slimserve_requests_total") >= 1
    assert metric(http, "slimserve_prefix_cache_queries_total") > 0


def test_bench_client_against_our_server(server):
    """The serving benchmark's own client, end to end: schema and consistent numbers."""
    from slimserve.bench.datasets import multi_turn_conversations, random_requests
    from slimserve.bench.metrics import summarize
    from slimserve.bench.serving import run_load

    reqs = random_requests(4, 30, 6, vocab=49152, seed=0)
    convos = multi_turn_conversations(
        2, 2, system_len=20, user_len=5, reply_len=5, output_len=4, vocab=49152
    )
    records, duration = asyncio.run(run_load(server.url, MODEL, reqs + convos, 3, api_key=API_KEY))
    assert len(records) == 4 + 2 * 2 and all(r.ok for r in records)
    for r, req in zip(records[:4], reqs):
        assert r.prompt_tokens == req.prompt_tokens and r.output_tokens == req.output_tokens
        assert r.e2e >= r.ttft > 0 and len(r.itl) == r.output_tokens - 1
    s = summarize(records, duration, {"ttft_ms": 60_000})
    assert s["completed"] == 8 and s["failed"] == 0 and s["goodput"] > 0
    total_in = sum(r.prompt_tokens for r in records)
    total_out = sum(r.output_tokens for r in records)
    assert s["total_tok_s"] == pytest.approx((total_in + total_out) / duration)
    assert s["e2e_ms"]["median"] >= s["ttft_ms"]["median"]
    down = asyncio.run(_unreachable(run_load))
    assert "cannot reach" in down


async def _unreachable(run_load):
    try:
        await run_load("http://127.0.0.1:9", None, [], 1)
    except RuntimeError as e:
        return str(e)
    return ""


def test_priority_reaches_the_engine_and_its_histogram(http, client):
    from prometheus_client.parser import text_string_to_metric_families

    def high_count():
        for family in text_string_to_metric_families(http.get("/metrics").text):
            for s in family.samples:
                if s.name.endswith("priority_seconds_count") and s.labels["priority"] == "high":
                    return s.value
        return 0.0

    before = high_count()
    r = client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=3, temperature=0, extra_body={"priority": -1}
    )
    assert r.choices[0].message.content is not None
    assert high_count() == before + 1
    assert metric(http, "slimserve_request_queue_time_seconds_count") >= 1
