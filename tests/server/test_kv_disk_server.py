"""The disk KV tier through the real server and the official client: a restarted server serves
a long system prompt from disk, with the same greedy text, and says so in usage and /metrics."""

import subprocess
import sys

import httpx
import openai

from tests.server.conftest import API_KEY, MODEL, ServerProcess

SYSTEM = (
    "You are the help desk of a city library. You answer questions about opening hours, loans, "
    "reading rooms and events, briefly and kindly, and you never invent a rule. "
) * 12
MESSAGES = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "Can I renew a loan online?"},
]


def ask(srv):
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=API_KEY)
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0)
    return r.choices[0].message.content, r.usage


def metric(srv, name, label=""):
    text = httpx.get(f"{srv.url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    for line in text.splitlines():
        if line.startswith(name + label + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name}{label} not in /metrics")


def test_a_restarted_server_reads_the_prefix_from_disk(tmp_path):
    flags = ("--api-key", API_KEY, "--served-model-name", MODEL, "--kv-disk-cache", str(tmp_path))
    first = ServerProcess(*flags)
    try:
        text, usage = ask(first)
        assert usage.prompt_tokens_details.cached_tokens == 0
        assert metric(first, "slimserve_kv_tier_saves_total") > 0
    finally:
        assert first.stop()[0] == 0  # SIGTERM: a clean stop writes what is queued
    second = ServerProcess(*flags)
    try:
        again, usage = ask(second)
        assert again == text
        cached = usage.prompt_tokens_details.cached_tokens
        assert cached >= usage.prompt_tokens - 16
        assert usage.prompt_tokens_details.model_extra["cached_tokens_by_tier"]["disk"] == cached
        assert metric(second, "slimserve_kv_tier_hits_total", '{tier="disk"}') == cached
        assert metric(second, "slimserve_kv_tier_bytes", '{tier="disk"}') > 0
        props = httpx.get(f"{second.url}/props", headers={"Authorization": f"Bearer {API_KEY}"})
        disk, mem = props.json()["kv_disk_cache"], props.json()["memory"]
        assert disk["pages"] > 0 and disk["saving"] and disk["bytes"] > 0
        assert mem["weights"] > 0 and mem["kv_cache"] > 0 and mem["kv_disk_buffers"] > 0
        assert metric(second, "slimserve_memory_bytes", '{part="weights"}') == mem["weights"]
    finally:
        second.stop()


def test_a_disk_cache_size_below_one_page_exits_2_naming_the_flag(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "slimserve", "generate", "hi", "--max-tokens", "1",
         "--kv-disk-cache", str(tmp_path), "--kv-disk-cache-size", "1KiB"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2
    assert "--kv-disk-cache-size" in r.stderr and "below one page" in r.stderr
