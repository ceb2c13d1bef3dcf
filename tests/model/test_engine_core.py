"""Continuous batching, prefix caching, chunked prefill, preemption and abort on the real model.

Every output is compared with the same request run alone; engines differ only in the option
under test."""

import pytest
import torch

from slimserve import LLM, SamplingParams

SYSTEM = (
    "You are a meticulous assistant for a library. Answer questions about books, authors "
    "and opening hours precisely and politely. "
) * 12


def chat_ids(llm, question, system=SYSTEM):
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    return llm.tokenizer.encode(llm.tokenizer.apply_chat_template(msgs))


def greedy(n, **kw):
    return SamplingParams(max_tokens=n, temperature=0.0, **kw)


@pytest.fixture(scope="module")
def cold_llm(gguf_path):
    """Prefix caching off: the reference for 'same output as a cold run'.

    These tests compare token ids exactly across batch shapes, so they run float32 weights: the
    int4 kernel's bf16 rounding differs with the batch shape, which can flip a near-tie."""
    return LLM(
        gguf_path,
        quantization="none",
        kv_cache_dtype="float32",
        kv_cache_memory="256MiB",
        enable_prefix_caching=False,
    )


def solo(llm, prompts, params):
    return [llm.generate([p], sp)[0].outputs[0] for p, sp in zip(prompts, params)]


def test_mixed_batch_equals_each_request_alone(llm, cold_llm):
    g = torch.Generator().manual_seed(0)
    prompts = [
        [1],
        chat_ids(llm, "Hi"),
        torch.randint(100, 40000, (1200,), generator=g).tolist(),
        chat_ids(llm, "Where is the poetry section?"),
        torch.randint(100, 40000, (300,), generator=g).tolist(),
        llm.tokenizer.encode("The capital of France is"),
    ]
    params = [greedy(5), greedy(24), greedy(8), greedy(40, stop=["."]), greedy(16), greedy(12)]
    batch = [o.outputs[0] for o in llm.generate(prompts, params)]
    alone = solo(cold_llm, prompts, params)
    assert [o.token_ids for o in batch] == [o.token_ids for o in alone]
    assert [o.text for o in batch] == [o.text for o in alone]
    assert [o.finish_reason for o in batch] == [o.finish_reason for o in alone]


def test_prefix_cache_hit_gives_the_cold_output(llm, cold_llm):
    kv = llm.engine.kv
    first, second = chat_ids(llm, "When do you open?"), chat_ids(llm, "Who wrote Dracula?")
    llm.generate([first], greedy(4))
    hits_before = kv.stats.hits
    out = llm.generate([second], greedy(24))[0].outputs[0]
    shared = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
    assert shared > 200
    assert kv.stats.hits - hits_before == shared // 16 * 16  # every full shared block, no more
    assert out.token_ids == cold_llm.generate([second], greedy(24))[0].outputs[0].token_ids


def test_identical_prompt_recomputes_only_the_last_token(llm):
    kv = llm.engine.kv
    ids = chat_ids(llm, "Identical prompt test " * 3)
    a = llm.generate([ids], greedy(8))[0].outputs[0]
    before = kv.stats.hits
    b = llm.generate([ids], greedy(8))[0].outputs[0]
    assert kv.stats.hits - before == (len(ids) - 1) // 16 * 16
    assert a.token_ids == b.token_ids


def test_divergent_and_partial_block_prefixes(llm, cold_llm):
    kv = llm.engine.kv
    base = llm.tokenizer.encode("Alpha beta gamma delta epsilon zeta eta theta iota kappa " * 4)
    assert len(base) >= 45
    llm.generate([base[:45]], greedy(2))  # caches 2 full blocks (32 tokens); the third is partial
    for tail in ([7, 8, 9], base[45:50]):
        prompt = base[:40] + tail  # diverges inside the third block
        before = kv.stats.hits
        out = llm.generate([prompt], greedy(8))[0].outputs[0]
        assert kv.stats.hits - before == 32
        assert out.token_ids == cold_llm.generate([prompt], greedy(8))[0].outputs[0].token_ids


def test_chunked_prefill_with_a_tiny_budget(gguf_path, llm):
    tiny = LLM(
        gguf_path,
        quantization="none",
        kv_cache_dtype="float32",
        kv_cache_memory="128MiB",
        max_num_batched_tokens=7,
        enable_prefix_caching=False,
    )
    prompts = [chat_ids(llm, "Tell me about whales."), llm.tokenizer.encode("Once upon a time")]
    params = [greedy(12), greedy(12)]
    assert [o.outputs[0].token_ids for o in tiny.generate(prompts, params)] == [
        o.token_ids for o in solo(llm, prompts, params)
    ]
    assert tiny.engine.stats().last_batch_tokens <= 7


def block_bytes(llm) -> int:
    spec = llm.engine.kv_spec
    return spec.block_size * spec.bytes_per_token


@pytest.fixture(scope="module")
def default_llm(gguf_path):
    """The default configuration (GGUF blocks through the native kernels, bf16 cache): every row
    is computed on its own there, so token ids compare exactly across batch shapes, and it runs
    ~5x faster than float32 weights."""
    return LLM(gguf_path, kv_cache_memory="128MiB", enable_prefix_caching=False)


def test_preemption_under_a_tiny_kv_budget_keeps_outputs(gguf_path, default_llm):
    # 32 blocks of 16 tokens; 3 requests of ~264 tokens each need ~51 blocks together.
    llm = default_llm
    small = LLM(
        gguf_path,
        kv_cache_memory=32 * block_bytes(llm),
        enable_prefix_caching=False,
    )
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(100, 40000, (200,), generator=g).tolist() for _ in range(3)]
    params = [greedy(64, ignore_eos=True)] * 3  # 2 admitted prompts outgrow 32 blocks
    outs = small.generate(prompts, params)
    assert small.engine.stats().preemptions > 0
    assert all(o.finished and len(o.outputs[0].token_ids) == 64 for o in outs)
    assert [o.outputs[0].token_ids for o in outs] == [
        o.token_ids for o in solo(llm, prompts, params)
    ]
    assert small.engine.kv.num_free_blocks == 32


def test_request_that_can_never_fit_is_refused(gguf_path, llm):
    from slimserve.errors import CapacityError

    small = LLM(
        gguf_path,
        quantization="none",
        kv_cache_dtype="float32",
        kv_cache_memory=4 * block_bytes(llm),
    )
    with pytest.raises(CapacityError, match="raise --kv-cache-memory"):
        small.generate([[5] * 60], greedy(10))
    assert not small.engine.has_unfinished()


def test_abort_anywhere_frees_every_block(llm):
    engine, kv = llm.engine, llm.engine.kv
    assert kv.num_free_blocks == kv.num_blocks
    # A system prompt no other test uses, so no block of it is cached.
    long_prompt = chat_ids(llm, "Summarise the printing press.", system="Abort test. " * 200)
    waiting = engine.add_request(chat_ids(llm, "a"), greedy(50))
    prefill = engine.add_request(long_prompt, greedy(50))
    decoding = engine.add_request(chat_ids(llm, "b"), greedy(50))
    engine.abort(waiting)  # before it ever ran
    engine.step()  # 'decoding' prefills, 'prefill' gets its first chunk
    assert engine.requests[prefill].num_computed_tokens < len(long_prompt)
    engine.abort(prefill)  # mid-prefill
    engine.step()
    engine.step()
    assert engine.requests[decoding].num_output_tokens >= 1
    engine.abort(decoding)  # mid-decode
    assert not engine.has_unfinished()
    # Freed blocks stay cached for reuse but every one is free again.
    assert kv.num_free_blocks == kv.num_blocks
    assert not kv.req_blocks
    out = llm.generate([chat_ids(llm, "b")], greedy(4))[0]  # the engine keeps serving
    assert out.finished


def test_stats_move(llm):
    s0 = llm.engine.stats()
    llm.generate([chat_ids(llm, "stats")], greedy(3))
    s1 = llm.engine.stats()
    assert s1.steps > s0.steps and s1.prefix_cache_queries > s0.prefix_cache_queries
    assert s1.tokens_computed > s0.tokens_computed and s1.running == s1.waiting == 0


def test_cascade_attention_over_a_shared_prefix_keeps_outputs(llm, cold_llm):
    """Decoding requests that share cached prefix blocks attend to them once (cascade); each
    output must equal the request run alone without any prefix cache. Only the PyTorch backend
    cascades (the native one keeps every row's arithmetic its own: backends/native_cpu.py)."""
    from slimserve import kernels

    kernels.set_enabled(False)
    llm.engine.use_kernels(True)
    try:
        _cascade_keeps_outputs(llm, cold_llm)
    finally:
        kernels.set_enabled(True)
        llm.engine.use_kernels(True)


def _cascade_keeps_outputs(llm, cold_llm):
    system = "Cascade test system prompt about gardening and soil. " * 12
    prompts = [
        chat_ids(llm, q, system)
        for q in ("Roses?", "Tulips in spring?", "Cacti?", "How deep to plant garlic?")
    ]
    llm.generate(prompts[:1], greedy(1))  # warm the prefix cache so the batch shares blocks
    groups = []
    backend = type(llm.engine.runner.backend)
    real = backend._decode_group

    def spy(self, *a):
        g = real(self, *a)
        if g.shared is not None:
            groups.append(g)
        return g

    backend._decode_group = spy
    try:
        batch = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy(16))]
    finally:
        backend._decode_group = real
    assert groups and groups[0].num_seqs == 4 and groups[0].shared_len >= 4 * 16
    assert batch == [o.token_ids for o in solo(cold_llm, prompts, [greedy(16)] * 4)]


def test_native_decode_attention_gives_the_pytorch_output(llm, monkeypatch):
    """The paged kernel (slimserve/kernels) and the gather + SDPA path, on one mixed batch with a
    shared-prefix (cascade) run and unrelated requests: the same greedy tokens."""
    from slimserve import kernels

    if not kernels.available():
        pytest.skip("no C compiler: only the PyTorch path exists here")
    calls = []
    real = kernels.paged_decode_attention
    monkeypatch.setattr(kernels, "paged_decode_attention", lambda *a: calls.append(1) or real(*a))
    system = "Native kernel test: you answer questions about rivers and lakes. " * 10
    prompts = [chat_ids(llm, q, system) for q in ("The Nile?", "Lake Baikal?", "The Rhine?")]
    prompts += [chat_ids(llm, "Hi"), llm.tokenizer.encode("The capital of France is")]
    llm.generate(prompts[:1], greedy(1))  # cache the shared prefix: the batch then cascades
    native = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy(20))]
    assert calls
    kernels.set_enabled(False)
    llm.engine.use_kernels(True)  # kernels are chosen at build: rebuild on the PyTorch paths
    try:
        calls.clear()
        assert not llm.engine.sampler.native_argmax  # the sampler follows the switch too
        reference = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy(20))]
        assert not calls
    finally:
        kernels.set_enabled(True)
        llm.engine.use_kernels(True)
    assert llm.engine.sampler.native_argmax
    assert native == reference


def test_bf16_kv_cache_gives_one_answer_whole_chunked_or_preempted(gguf_path, default_llm):
    """The default cache. A fresh prompt attends to its keys rounded as the cache stores them, so
    computing it whole, in 16-token chunks, or again after preemption gives the same tokens.

    (Only float rounding noise is left between those paths; an int8 cache can turn that noise
    into a different code near a rounding boundary, so it is not held to this.)"""
    kv_dtype = "bfloat16"
    whole = default_llm
    assert whole.engine.config.cache.dtype == kv_dtype
    bytes_per_block = block_bytes(whole)
    squeezed = LLM(
        gguf_path,
        kv_cache_dtype=kv_dtype,
        kv_cache_memory=30 * bytes_per_block,
        max_num_batched_tokens=16,
        enable_prefix_caching=False,
    )
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(100, 40000, (200,), generator=g).tolist() for _ in range(3)]
    params = [greedy(48, ignore_eos=True)] * 3  # 3 x 248 tokens in 30 blocks of 16: preempted
    outs = squeezed.generate(prompts, params)
    assert squeezed.engine.stats().preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == [
        o.token_ids for o in solo(whole, prompts, params)
    ]
