"""Bad requests, authentication and disconnects: each gets a precise OpenAI-style error or ends
cleanly, frees what it held, and the server keeps serving everyone else."""

import time

import httpx
import openai
import pytest

from .conftest import API_KEY, MODEL, QUESTION, metric

BAD = [
    ("not json", 400, None),
    ({"model": MODEL}, 400, "messages"),
    ({"model": MODEL, "messages": "hello"}, 400, "messages"),
    ({"model": MODEL, "messages": QUESTION, "temperature": "hot"}, 400, "temperature"),
    ({"model": MODEL, "messages": QUESTION, "temperature": 5}, 400, "temperature"),
    ({"model": MODEL, "messages": QUESTION, "max_tokens": 0}, 400, "max_tokens"),
    ({"model": MODEL, "messages": QUESTION, "max_tokens": 100000}, 400, "max_tokens"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    ({"model": "gpt-4", "messages": QUESTION}, 404, None),
    # Found by trying the server as a hostile client would: each of these was a bare 500, or
    # (top_k) a crash of the engine thread that left every later request failing.
    ({"model": MODEL, "messages": QUESTION, "top_k": 2**64}, 400, "top_k"),
    ({"model": MODEL, "messages": QUESTION, "top_k": 1e30}, 400, "top_k"),
    ({"model": MODEL, "messages": QUESTION, "seed": 2**64}, 400, "seed"),
    ({"model": MODEL, "messages": QUESTION, "seed": -(2**63) - 1}, 400, "seed"),
    ('{"model": "smollm2", "messages": [{"role": "user", "content": "\\ud800"}]}', 400,
     "messages.0.content"),
    ('{"model": "\\udfff", "messages": [{"role": "user", "content": "hi"}]}', 400, "model"),
    ('{"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
     400, "temperature"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]},
     400, "messages.0.content.0"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": 7}]}]},
     400, "messages.0.content.0.text"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     400, "messages.0.content.0"),
    ({"model": MODEL, "messages": [1]}, 400, "messages.0"),
    ([QUESTION], 400, None),
    ({"model": MODEL, "messages": QUESTION, "stop": ["x"] * 100}, 400, "stop"),
    ({"model": MODEL, "messages": QUESTION, "stop_token_ids": [-1]}, 400, "stop_token_ids.0"),
    ({"model": MODEL, "messages": QUESTION, "max_tokens": 2**70}, 400, "max_tokens"),
    ({"model": MODEL, "messages": QUESTION, "priority": "urgent"}, 400, "priority"),
    ({"model": MODEL, "messages": QUESTION, "priority": 2**31}, 400, "priority"),
    ({"model": MODEL, "messages": QUESTION, "session_id": "no spaces please"}, 400, "session_id"),
    ({"model": MODEL, "messages": QUESTION, "session_id": 7}, 400, "session_id"),
    # Fields that would change the answer's meaning are refused, not ignored.
    ({"model": MODEL, "messages": QUESTION, "response_format": {"type": "xml"}}, 400,
     "response_format.type"),
    ({"model": MODEL, "messages": QUESTION,
      "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, 400,
     "response_format"),
    ({"model": MODEL, "messages": QUESTION, "response_format": {"type": "json_schema",
      "json_schema": {"name": "x", "schema": {"type": "object", "minProperties": "two"}}}}, 400,
     "response_format"),
    ({"model": MODEL, "messages": QUESTION, "guided_regex": "a(+"}, 400, "guided_regex"),
    ({"model": MODEL, "messages": QUESTION, "structured_outputs": {"grammar": "start: ("}}, 400,
     "structured_outputs"),
    ({"model": MODEL, "messages": QUESTION, "structured_outputs": {"choice": []}}, 400,
     "structured_outputs.choice"),
    ({"model": MODEL, "messages": QUESTION, "structured_outputs": {"structural_tag": "x"}}, 400,
     "structured_outputs.structural_tag"),
    ({"model": MODEL, "messages": QUESTION, "guided_regex": "a+",
      "response_format": {"type": "json_object"}}, 400, "guided_regex"),
    ({"model": MODEL, "messages": QUESTION, "tools": [{"type": "function"}]}, 400,
     "tools.0.function"),
    ({"model": MODEL, "messages": QUESTION, "logit_bias": {"1": 100}}, 400, "logit_bias"),
    ({"model": MODEL, "messages": QUESTION, "echo": True}, 400, "echo"),  # completions only
]  # fmt: skip


@pytest.mark.parametrize("body, status, param", BAD, ids=range(len(BAD)))
def test_bad_input_gets_openai_error_and_server_stays_healthy(http, body, status, param):
    kwargs = {"content": body} if isinstance(body, str) else {"json": body}
    r = http.post("/v1/chat/completions", headers={"Content-Type": "application/json"}, **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    if body is BAD[6][0]:
        assert "8192" in err["message"] and "100000" in err["message"]
    ok = http.post(
        "/v1/chat/completions", json={"model": MODEL, "messages": QUESTION, "max_tokens": 2}
    )
    assert ok.status_code == 200
    assert http.get("/health").status_code == 200


BAD_COMPLETIONS = [
    ({"model": MODEL, "prompt": []}, "prompt"),
    ({"model": MODEL, "prompt": [[-1]]}, "prompt.0.0"),
    ({"model": MODEL, "prompt": [10**9]}, "prompt"),  # past the vocabulary: the engine says
    ({"model": MODEL, "prompt": "hi", "max_tokens": 0}, "max_tokens"),  # only with echo
    ({"model": MODEL, "prompt": "hi", "max_tokens": -1, "echo": True}, "max_tokens"),
    ({"model": MODEL, "prompt": "hi", "suffix": "x"}, "suffix"),
    ({"model": MODEL, "prompt": "hi", "best_of": 3}, "best_of"),
    ({"model": MODEL, "prompt": ["hi"] * 100, "n": 16}, "n"),
]


@pytest.mark.parametrize("body, param", BAD_COMPLETIONS, ids=range(len(BAD_COMPLETIONS)))
def test_bad_completion_bodies(http, body, param):
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_authentication_comes_before_the_body(server):
    """An unauthenticated caller gets 401 whatever it sends: it learns nothing of validation."""
    for content in ("not json", '{"model": 1}'):
        r = httpx.post(server.url + "/v1/chat/completions", content=content)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_api_key_is_enforced(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(
            server.url + "/v1/chat/completions",
            headers=headers,
            json={"model": MODEL, "messages": QUESTION},
        )
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()


def test_disconnect_mid_stream_aborts_and_frees_blocks(server, http):
    blocks_before = metric(http, "slimserve_kv_cache_blocks_used")
    with httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60
    ) as c:
        with c.stream(
            "POST",
            "/v1/chat/completions",
            json={
                "model": MODEL,
                "messages": QUESTION,
                "max_tokens": 2000,
                "stream": True,
                "ignore_eos": True,
            },
        ) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i > 5:
                    break  # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if metric(http, "slimserve_num_requests_running") == 0:
            break
        time.sleep(0.1)
    assert metric(http, "slimserve_num_requests_running") == 0
    assert metric(http, "slimserve_kv_cache_blocks_used") == blocks_before


def test_disconnect_while_waiting_non_streaming(server, http):
    blocks_before = metric(http, "slimserve_kv_cache_blocks_used")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            server.url + "/v1/completions",
            timeout=1.5,
            headers={"Authorization": f"Bearer {API_KEY}"},
            json={
                "model": MODEL,
                "prompt": "Tell a long story.",
                "max_tokens": 2000,
                "ignore_eos": True,
            },
        )
    deadline = time.monotonic() + 10
    while metric(http, "slimserve_num_requests_running") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(http, "slimserve_num_requests_running") == 0
    assert metric(http, "slimserve_kv_cache_blocks_used") == blocks_before
