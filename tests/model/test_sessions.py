"""Agent sessions on the real default model: a kept session's next turn hits its prefix after
other requests have flooded the pool, gives the same tokens, and gives way under pressure."""

import time

import pytest
import torch

from slimserve import LLM, SamplingParams
from slimserve.errors import InvalidRequest

SYSTEM = (
    "You are a coding agent. You read files, call tools and explain each change you make in "
    "one short sentence, and you never touch files you were not asked to change. "
) * 8


def turn(llm, history):
    return llm.tokenizer.encode(llm.tokenizer.apply_chat_template(history))


def agent_loop(llm, session):
    """Turn 1, unrelated prompts that together evict every unpinned block (during the tool
    call), turn 2."""
    history = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "List the files."},
    ]
    p1 = SamplingParams(max_tokens=16, temperature=0.0, session_id=session)
    first = llm.generate([turn(llm, history)], p1)[0]
    g = torch.Generator().manual_seed(5)
    flood = [torch.randint(100, 40000, (300,), generator=g).tolist() for _ in range(6)]
    for prompt in flood:  # one at a time: each fits beside a kept session, all of them do not
        llm.generate([prompt], SamplingParams(max_tokens=4, temperature=0.0))
    history += [
        {"role": "assistant", "content": first.outputs[0].text},
        {"role": "user", "content": "Open the first one."},
    ]
    second = llm.generate([turn(llm, history)], p1)[0]
    return first, second


@pytest.fixture(scope="module")
def pool_bytes(gguf_path):
    probe = LLM(gguf_path, kv_cache_memory="16MiB")
    return 60 * probe.engine.kv_spec.page_bytes  # ~960 tokens: the flood evicts everything


def test_a_kept_session_hits_after_a_flood(gguf_path, pool_bytes):
    cold = LLM(gguf_path, kv_cache_memory=pool_bytes)
    kept = LLM(gguf_path, kv_cache_memory=pool_bytes, session_ttl=600)
    c1, c2 = agent_loop(cold, "agent-1")
    k1, k2 = agent_loop(kept, "agent-1")
    assert k2.outputs[0].token_ids == c2.outputs[0].token_ids
    assert c2.num_cached_tokens == 0 and c2.session_diverged_at is None
    assert k2.num_cached_tokens >= len(k1.prompt_token_ids) - 16
    assert k2.session_diverged_at >= len(k1.prompt_token_ids)
    s = kept.engine.stats()
    assert s.sessions == 1 and s.session_pinned_blocks > 0


def test_sessions_expire_and_give_way_under_pressure(gguf_path, pool_bytes):
    llm = LLM(gguf_path, kv_cache_memory=pool_bytes, session_ttl=0.2)
    history = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi."}]
    llm.generate([turn(llm, history)], SamplingParams(max_tokens=2, session_id="a"))
    assert llm.engine.stats().sessions == 1
    time.sleep(0.3)
    llm.generate([[5, 6, 7]], SamplingParams(max_tokens=1))
    s = llm.engine.stats()
    assert s.sessions == 0 and s.sessions_expired == 1 and s.session_pinned_blocks == 0

    llm = LLM(gguf_path, kv_cache_memory=pool_bytes, session_ttl=600)
    llm.generate([turn(llm, history)], SamplingParams(max_tokens=2, session_id="a"))
    g = torch.Generator().manual_seed(6)
    big = torch.randint(100, 40000, (900,), generator=g).tolist()  # needs nearly every block
    out = llm.generate([big], SamplingParams(max_tokens=4, temperature=0.0))[0]
    assert len(out.outputs[0].token_ids) == 4
    s = llm.engine.stats()
    assert s.sessions_pressed == 1 and s.sessions == 0
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks


def test_bad_session_ids_and_the_cap(gguf_path):
    with pytest.raises(InvalidRequest, match="session_id") as e:
        SamplingParams(session_id="not ok!")
    assert e.value.param == "session_id"
    with pytest.raises(InvalidRequest):
        SamplingParams(session_id="x" * 129)
    llm = LLM(gguf_path, kv_cache_memory="16MiB", session_ttl=600, max_sessions=1)
    llm.generate([[5, 6, 7]], SamplingParams(max_tokens=1, session_id="one"))
    llm.generate([[5, 6, 8]], SamplingParams(max_tokens=1, session_id="one"))  # the same: fine
    with pytest.raises(InvalidRequest, match="max-sessions") as e:
        llm.generate([[5, 6, 9]], SamplingParams(max_tokens=1, session_id="two"))
    assert e.value.param == "session_id"
    assert llm.generate([[5, 6, 9]], SamplingParams(max_tokens=1))[0].finished  # others go on


def test_a_memory_budget_sizes_the_kv_pool_and_refuses_what_cannot_fit(gguf_path):
    from slimserve.engine.memory import weight_bytes

    probe = LLM(gguf_path, kv_cache_memory="16MiB")
    weights = weight_bytes(probe.engine.model)
    llm = LLM(gguf_path, memory_budget=weights + (8 << 20))  # asks 1GiB of KV by default
    m = llm.engine.memory()
    assert m["weights"] + m["kv_cache"] + m["expert_cache"] + m["kv_disk_buffers"] <= weights + (
        8 << 20
    )
    assert m["kv_cache"] > 4 << 20
    assert llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2))[0].finished
    with pytest.raises(InvalidRequest, match="does not hold weights") as e:
        LLM(gguf_path, memory_budget=weights // 2)
    assert e.value.param == "memory_budget"
