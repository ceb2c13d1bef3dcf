"""Scale-out on a real local Ray cluster: two engine replicas behind the prefix-aware router,
driven with the official openai client; a replica killed mid-run is replaced."""

import os
import signal
import time

import httpx
import pytest

pytest.importorskip("ray.serve")

SYSTEM = (
    "You are a support assistant for a company that sells garden tools. Answer briefly, "
    "politely and only about the company's products: spades, rakes, hoes, shears, hoses and "
    "wheelbarrows. Prices: spade 20 dollars, rake 15, hoe 12, shears 18, hose 25, wheelbarrow "
    "90. Shipping takes three days. Returns are free within thirty days. "
) * 3


@pytest.fixture(scope="module")
def cluster(gguf_path):
    import ray
    from ray import serve

    from slimserve.bench.peers import free_port
    from slimserve.distributed.serve import deploy, wait_ready

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             configure_logging=False)  # fmt: skip
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        deploy(gguf_path, replicas=2, settings={"kv_cache_memory": "64MiB"}, served_name="smol")
        url = f"http://127.0.0.1:{port}"
        wait_ready(url)
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


def _stats(url):
    return httpx.get(url + "/router/stats", timeout=30).json()


def test_openai_client_streamed_and_not_and_errors_pass_through(cluster, gguf_path):
    import openai

    from slimserve import LLM, SamplingParams

    client = openai.OpenAI(base_url=cluster + "/v1", api_key="none", timeout=120)
    msgs = [{"role": "user", "content": "Name a colour."}]
    r = client.chat.completions.create(model="smol", messages=msgs, max_tokens=12, temperature=0)
    text = r.choices[0].message.content
    parts = client.chat.completions.create(
        model="smol", messages=msgs, max_tokens=12, temperature=0, stream=True
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in parts if c.choices)
    assert text and streamed == text
    # The same text a single engine gives (the replicas run the same engine).
    alone = LLM(gguf_path, kv_cache_memory="64MiB").chat(
        msgs, SamplingParams(max_tokens=12, temperature=0)
    )
    assert alone[0].outputs[0].text == text
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="other", messages=msgs, max_tokens=2)
    bad = httpx.post(cluster + "/v1/chat/completions", content=b"{not json", timeout=30,
                     headers={"content-type": "application/json"})  # fmt: skip
    assert bad.status_code == 400 and "error" in bad.json()


def test_shared_prefix_requests_land_on_one_replica(cluster):
    import openai

    client = openai.OpenAI(base_url=cluster + "/v1", api_key="none", timeout=120)
    before = _stats(cluster)
    for q in ("Price of a rake?", "How long is shipping?", "Can I return shears?", "Hose?"):
        client.chat.completions.create(
            model="smol", max_tokens=4, temperature=0,
            messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}],
        )  # fmt: skip
    after = _stats(cluster)
    sent = [a - b for a, b in zip(after["router"]["sent"], before["router"]["sent"])]
    assert sorted(sent) == [0, 4]
    chosen = sent.index(4)
    hits = [r["prefix_cache_hits"] for r in after["replicas"]]
    was = [r["prefix_cache_hits"] for r in before["replicas"]]
    assert hits[chosen] - was[chosen] >= 3 * 200  # three later requests reuse the system prompt
    assert after["router"]["matched_blocks"][chosen] > before["router"]["matched_blocks"][chosen]
    # Replicas on one machine split its cores, one thread per core they hold.
    cores = [set(r["cores"]) for r in after["replicas"]]
    assert all(r["threads"] == len(r["cores"]) for r in after["replicas"])
    assert not cores[0] & cores[1] or len(os.sched_getaffinity(0)) < 2


def test_router_metrics_merge_every_replica(cluster):
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(cluster + "/metrics", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    up = {s.labels["replica"]: s.value for s in families["slimserve_replica_up"].samples}
    assert up == {"0": 1.0, "1": 1.0}
    # Each replica's series under its own label: its step count is the one its engine reports
    # (nothing runs between the two reads).
    steps = {s.labels["replica"]: s.value for s in families["slimserve_engine_steps"].samples
             if s.name.endswith("_total")}  # fmt: skip
    replicas = _stats(cluster)["replicas"]
    assert steps == {str(i): float(rep["steps"]) for i, rep in enumerate(replicas)}
    assert sum(steps.values()) > 0  # the earlier tests' requests ran somewhere


def test_a_killed_replica_is_routed_around_and_replaced(cluster):
    import openai

    client = openai.OpenAI(base_url=cluster + "/v1", api_key="none", timeout=120, max_retries=0)
    victim = _stats(cluster)["replicas"][0]
    os.kill(victim["pid"], signal.SIGKILL)
    for i in range(3):  # answered by the other replica meanwhile
        r = client.completions.create(model="smol", prompt=f"Count to {i + 3}:", max_tokens=4)
        assert r.choices[0].text is not None
    deadline = time.monotonic() + 120
    while True:
        rep = _stats(cluster)["replicas"][0]
        if "pid" in rep and rep["pid"] != victim["pid"]:
            break
        assert time.monotonic() < deadline, f"replica 0 was not replaced: {rep}"
        time.sleep(1)
    r = client.completions.create(model="smol", prompt="Hello", max_tokens=3)
    assert r.choices[0].text is not None
