"""Schema-driven fuzzing of every route: valid bodies with one or more fields replaced by hostile
values (huge integers, NaN, lone surrogates, wrong types, nested junk), and unknown fields.

Whatever arrives, the answer is a 2xx, or a 4xx/503 with an OpenAI-shaped error; never a 5xx
that is not ours; and afterwards the server is healthy with no request running and no KV block
held. Bounded in time: a few hundred requests of at most 3 generated tokens."""

import json

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slimserve.server.protocol import _UNSUPPORTED, ChatCompletionRequest, CompletionRequest

from .conftest import API_KEY, metric

MODEL = "smollm2"
surrogates = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
texts = st.text(st.one_of(st.characters(), surrogates), max_size=12)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 2**31, 2**63 - 1, 2**63, 2**64]),
    st.floats(allow_nan=True, allow_infinity=True),
    texts,
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(texts, inner, max_size=3)),
    max_leaves=8,
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "wizard"])},
        optional={"content": st.one_of(texts, values)},
    ),
    max_size=3,
)
CHAT_FIELDS = sorted(set(ChatCompletionRequest.model_fields) | set(_UNSUPPORTED))
COMPLETION_FIELDS = sorted(set(CompletionRequest.model_fields) | set(_UNSUPPORTED))


def mutated(base: dict, fields: list[str], extra: dict):
    """`base` with some fields (known ones, unsupported ones, made-up ones) set to junk."""
    return st.tuples(
        # Mostly one field at a time, so the rest of the body stays valid and the value reaches
        # the engine; hostile scalars more often than nested junk.
        st.dictionaries(st.sampled_from(fields), st.one_of(scalars, scalars, values), max_size=2),
        st.one_of(st.just({}), st.just({}), st.dictionaries(texts, values, max_size=1)),
        st.one_of(st.just({}), st.fixed_dictionaries(extra)),
    ).map(lambda t: {**base, **t[2], **t[0], **t[1]})


def bounded(body):
    """Keep generation short: a valid max_tokens becomes at most 3 (absent, 2)."""
    if isinstance(body, dict):
        for key in ("max_tokens", "max_completion_tokens"):
            v = body.get(key)
            if type(v) is int and v >= 1:
                body[key] = min(v, 3)
        body.setdefault("max_tokens", 2)
    return body


CHAT = mutated(
    {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]},
    CHAT_FIELDS,
    {"messages": st.one_of(st.just([{"role": "user", "content": "Hi"}]), messages)},
)
COMPLETION = mutated(
    {"model": MODEL, "prompt": "Hi"},
    COMPLETION_FIELDS,
    {
        "prompt": st.one_of(
            st.just("Hi"), texts, st.lists(st.integers(-5, 60000), max_size=4), values
        )
    },
)
ROUTES = st.one_of(
    st.tuples(st.just("/v1/chat/completions"), CHAT),
    st.tuples(st.just("/v1/completions"), COMPLETION),
    st.tuples(st.sampled_from(["/v1/chat/completions", "/v1/completions"]), values),
)


def check(r: httpx.Response) -> None:
    assert r.status_code in (200, 400, 404, 413, 503), (r.status_code, r.text[:500])
    if r.status_code != 200:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
    elif r.headers["content-type"].startswith("text/event-stream"):
        events = [ln[6:] for ln in r.text.splitlines() if ln.startswith("data: ")]
        assert events[-1] == "[DONE]" or "error" in json.loads(events[-1]), r.text[-500:]
    else:
        assert r.json()["choices"]


def test_fuzzed_bodies_get_openai_answers_and_leave_the_server_clean(server):
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=120) as http:
        sent = []

        @settings(
            max_examples=250,
            deadline=None,
            database=None,
            derandomize=True,  # the same examples every run: CI is not a lottery
            suppress_health_check=list(HealthCheck),
        )
        @given(ROUTES)
        def one(case):
            path, body = case
            content = json.dumps(bounded(body))  # ensure_ascii: surrogates travel as \udxxx
            r = http.post(path, content=content)
            sent.append(r.status_code)
            check(r)

        one()
        assert http.get("/health").status_code == 200
        assert http.get("/v1/models").status_code == 200
        assert metric(http, "slimserve_num_requests_running") == 0
        assert metric(http, "slimserve_kv_cache_blocks_used") == 0
    print("fuzz statuses", {c: sent.count(c) for c in set(sent)})
    assert len(sent) >= 200 and sent.count(200) >= 10 and sent.count(400) >= 50
