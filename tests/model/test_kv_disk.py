"""The disk KV tier on the real default model: the same tokens with and without it, after a
restart, after swap preemption, and whatever happened to the files (flipped, truncated, zeroed,
a writer killed mid-write); another model's pages are never read."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from slimserve import LLM, SamplingParams

SYSTEM = (
    "You are the on-call assistant of a small observatory. You answer visitors' questions about "
    "telescopes, opening hours, the night sky and the history of astronomy, briefly and kindly. "
) * 8


def chat(llm, question):
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    return llm.tokenizer.encode(llm.tokenizer.apply_chat_template(msgs))


GREEDY = SamplingParams(max_tokens=24, temperature=0.0)
SEEDED = SamplingParams(max_tokens=24, temperature=0.8, top_p=0.95, seed=7)


def tokens(llm, prompt, params=GREEDY):
    return llm.generate([prompt], params)[0].outputs[0].token_ids


@pytest.fixture(scope="module")
def plain(gguf_path):
    return LLM(gguf_path, kv_cache_memory="64MiB")


def test_restart_hits_the_disk_with_the_same_tokens(gguf_path, plain, tmp_path):
    prompt = chat(plain, "When is the telescope open to the public?")
    want, want_seeded = tokens(plain, prompt), tokens(plain, prompt, SEEDED)
    first = LLM(gguf_path, kv_cache_memory="64MiB", kv_disk_cache=str(tmp_path))
    assert tokens(first, prompt) == want
    first.engine.close()  # a clean shutdown: every page written
    assert first.engine.stats().tier_saves >= (len(prompt) - 1) // 16

    second = LLM(gguf_path, kv_cache_memory="64MiB", kv_disk_cache=str(tmp_path))
    out = second.generate([prompt], GREEDY)[0]
    assert out.outputs[0].token_ids == want
    assert out.num_cached_tokens == (len(prompt) - 1) // 16 * 16
    s = second.engine.stats()
    assert s.tier_hits == out.num_cached_tokens and s.prompt_tokens_computed < 16
    second.engine.kv.reset_prefix_cache()  # RAM forgets: seeded sampling from disk pages
    assert tokens(second, prompt, SEEDED) == want_seeded
    assert second.engine.stats().tier_hits == 2 * out.num_cached_tokens
    second.engine.close()


@pytest.mark.parametrize("damage", ["flip", "truncate", "zero"])
def test_damaged_records_are_recomputed_never_served(gguf_path, plain, tmp_path, damage):
    prompt = chat(plain, "Which planets can I see tonight?")
    want = tokens(plain, prompt)
    llm = LLM(gguf_path, kv_cache_memory="64MiB", kv_disk_cache=str(tmp_path))
    tokens(llm, prompt)
    llm.engine.close()
    files = sorted(tmp_path.glob("*/*.kv"))
    assert files
    for i, f in enumerate(files):
        data = bytearray(f.read_bytes())
        if damage == "flip":
            data[(i * 7919) % len(data)] ^= 0x10  # a different byte in each record
        elif damage == "truncate":
            data = data[: len(data) // 2]
        else:
            data = bytearray(len(data))
        f.write_bytes(bytes(data))
    again = LLM(gguf_path, kv_cache_memory="64MiB", kv_disk_cache=str(tmp_path))
    out = again.generate([prompt], GREEDY)[0]
    assert out.outputs[0].token_ids == want
    assert out.num_cached_tokens == 0
    assert again.engine.stats().tier_corrupt >= 1  # counted (read ahead, or when needed)
    again.engine.close()


def test_another_kv_format_never_reads_these_pages(gguf_path, plain, tmp_path):
    prompt = chat(plain, "Who built the first reflecting telescope?")
    bf16 = LLM(gguf_path, kv_cache_memory="64MiB", kv_disk_cache=str(tmp_path))
    tokens(bf16, prompt)
    bf16.engine.close()
    f32 = LLM(
        gguf_path, kv_cache_memory="64MiB", kv_cache_dtype="float32", kv_disk_cache=str(tmp_path)
    )
    out = f32.generate([prompt], GREEDY)[0]
    assert out.num_cached_tokens == 0 and f32.engine.stats().tier_corrupt == 0
    f32.engine.close()


def test_swap_preemption_brings_pages_back_instead_of_recomputing(gguf_path, plain, tmp_path):
    """A pool of ~1.75 requests with nothing in common: a preempted request's blocks are evicted
    from RAM by the others, and come back from disk."""
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(100, 40000, (200,), generator=g).tolist() for _ in range(4)]
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, params)]
    page = plain.engine.kv_spec.page_bytes
    need = plain.engine.kv.blocks_needed(len(prompts[0]) + 64)
    runs = {}
    for name, disk in (("ram", None), ("disk", str(tmp_path))):
        llm = LLM(gguf_path, kv_cache_memory=int(need * 1.75) * page, kv_disk_cache=disk)
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        assert got == want
        runs[name] = llm.engine.stats()
        llm.engine.close()
    assert runs["disk"].preemptions > 0 and runs["disk"].preemptions_swap > 0
    assert runs["disk"].tier_loads > 0
    assert runs["disk"].recomputed_tokens < runs["ram"].recomputed_tokens


WRITER = textwrap.dedent(
    """
    import sys
    from slimserve import LLM, SamplingParams
    llm = LLM(sys.argv[1], kv_cache_memory="64MiB", kv_disk_cache=sys.argv[2])
    print("ready", flush=True)
    i = 0
    while True:  # distinct prompts forever: the disk writer is always busy
        llm.generate([[100 + i] + list(range(200, 1000))], SamplingParams(max_tokens=1))
        i += 1
    """
)


def test_a_writer_killed_mid_write_leaves_nothing_wrong(gguf_path, plain, tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, gguf_path, str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout.readline().strip() == b"ready"
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("*/*.kv"))) < 60 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    prompts = [[100 + i] + list(range(200, 1000)) for i in range(3)]
    want = [tokens(plain, p, SamplingParams(max_tokens=8, temperature=0.0)) for p in prompts]
    llm = LLM(gguf_path, kv_cache_memory="64MiB", kv_disk_cache=str(tmp_path))
    assert not list(tmp_path.glob("*/*.tmp.*"))  # the dead writer's half-written file is gone
    got = [tokens(llm, p, SamplingParams(max_tokens=8, temperature=0.0)) for p in prompts]
    assert got == want
    assert llm.engine.stats().tier_hits > 0
    llm.engine.close()
