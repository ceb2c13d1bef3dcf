"""Beside the OpenAI API: /tokenize, /detokenize, /props, the chat page's files, and usage's
cached_tokens."""

import httpx

from .conftest import MODEL, QUESTION


def test_tokenize_detokenize_props(http, llm, client):
    text = "The capital of France is Paris."
    r = http.post("/tokenize", json={"prompt": text}).json()
    assert r["tokens"] == llm.tokenizer.encode(text) and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == llm.engine.max_model_len
    pieces = http.post("/tokenize", json={"content": text, "with_pieces": True}).json()["tokens"]
    assert [p["id"] for p in pieces] == r["tokens"] and "".join(p["piece"] for p in pieces) == text
    chat = http.post("/tokenize", json={"messages": QUESTION}).json()
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=1)
    assert chat["count"] == reply.usage.prompt_tokens  # the chat endpoint's own prompt
    back = http.post("/detokenize", json={"tokens": r["tokens"]}).json()
    assert back["prompt"] == text == back["content"]
    for path, body, param in (
        ("/tokenize", {"prompt": "a", "messages": QUESTION}, "prompt"),
        ("/tokenize", {}, "prompt"),
        ("/detokenize", {"tokens": [10**8]}, "tokens.0"),
        ("/detokenize", {"tokens": [-1]}, "tokens.0"),
    ):
        bad = http.post(path, json=body)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == param, bad.text
    props = http.get("/props").json()
    assert props["model"] == MODEL and props["architecture"] == "llama"
    assert props["max_model_len"] == llm.engine.max_model_len
    assert props["kv_cache"]["groups"] == [{"layers": list(range(30)), "window": 0}]
    assert props["kv_cache"]["capacity_tokens"] > 0 and props["quantization"]
    assert props["engine"]["max_num_batched_tokens"] > 0
    assert httpx.get(http.base_url.join("/props")).status_code == 401  # behind the key


def test_cached_tokens_reported(client):
    # A long shared prefix: the second request takes its full blocks from the prefix cache.
    prefix = "You are a careful assistant who answers in one short sentence. " * 8
    msgs = [{"role": "system", "content": prefix}, {"role": "user", "content": "Hi"}]
    first = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2)
    again = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2)
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert cached % 16 == 0 and again.usage.prompt_tokens - 16 <= cached < again.usage.prompt_tokens
    assert first.usage.prompt_tokens_details.cached_tokens < cached
    for _ in range(2):
        c = client.completions.create(model=MODEL, prompt=prefix, max_tokens=1)
    assert c.usage.prompt_tokens_details.cached_tokens >= c.usage.prompt_tokens - 16


def test_chat_page_is_served(server):
    page = httpx.get(server.url + "/")  # public: the page asks for the key itself
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert '<script src="/static/chat.js">' in page.text
    js = httpx.get(server.url + "/static/chat.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    assert "/v1/chat/completions" in js.text
    assert httpx.get(server.url + "/static/chat.css").status_code == 200
    missing = httpx.get(server.url + "/static/../api.py")
    assert missing.status_code == 404
