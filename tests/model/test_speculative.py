"""Speculative decoding with the real proposers on the real model: the output is plain decoding's.

Greedy: token for token, batched and alone, through chunked prefill and preemption. Seeded: the
same text. Unseeded: the same distribution (a chi-square test over many draws). And what a
verify leaves behind: no rejected draft's KV in the prefix cache, stops and max_tokens cut inside
an accepted run, logprobs equal to plain decoding's."""

import math
from collections import Counter

import pytest
import torch

from slimserve import LLM, SamplingParams
from slimserve.bench.speculative import load_prompts

METHODS = ["ngram", "suffix"]
GREEDY = SamplingParams(max_tokens=80, temperature=0.0)


@pytest.fixture(scope="module")
def plain(gguf_path):
    return LLM(gguf_path, kv_cache_memory="64MiB")


@pytest.fixture(scope="module")
def prompts(plain):
    sets = load_prompts(plain.tokenizer)
    return [ids for _, ids in sets["repetitive"][:4] + sets["open"][:2]]


def _spec(method="suffix", **settings):
    # Every draft found is verified (no cost model), so every path of a verify is exercised;
    # the cost model's choices are tested in tests/unit/test_spec_decode.py.
    settings.setdefault("kv_cache_memory", "64MiB")
    return LLM(speculative=method, speculative_adaptive=False, **settings)


@pytest.fixture(scope="module", params=METHODS)
def spec(request):
    return _spec(request.param)


def _ids(outs):
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def reference(plain, prompts):
    return _ids(plain.generate(prompts, GREEDY))


def test_greedy_batched_equals_plain(spec, prompts, reference):
    before = spec.engine.stats()
    assert _ids(spec.generate(prompts, GREEDY)) == reference
    after = spec.engine.stats()
    accepted = after.spec_accepted_tokens - before.spec_accepted_tokens
    assert accepted >= 40  # the drafts were real and many were kept
    assert after.spec_draft_tokens > accepted  # and some were not


def test_greedy_alone_equals_plain(spec, prompts, reference):
    for ids, ref in zip(prompts[:3], reference):
        assert _ids(spec.generate([ids], GREEDY)) == [ref]


@pytest.mark.parametrize("method", METHODS)
def test_greedy_through_chunked_prefill_and_preemption(gguf_path, prompts, reference, method):
    tight = _spec(method, kv_cache_memory="20MiB", max_num_batched_tokens=48)
    assert _ids(tight.generate(prompts, GREEDY)) == reference
    stats = tight.engine.stats()
    assert stats.preemptions > 0 and stats.spec_accepted_tokens > 0


def test_seeded_sampling_gives_the_same_text(plain, spec, prompts):
    params = SamplingParams(max_tokens=60, temperature=0.8, top_p=0.95, seed=11)
    assert _ids(spec.generate(prompts[:3], params)) == _ids(plain.generate(prompts[:3], params))


def test_unseeded_sampling_follows_the_target_distribution(gguf_path, plain):
    """Many unseeded draws of a short continuation that drafts predict well: the tokens drawn at
    each position have the same distribution with and without speculation (chi-square test of
    homogeneity; a broken acceptance rule shifts mass towards the drafts by far more)."""
    spec = _spec()
    text = "one two three four five six seven eight nine ten " * 3
    ids = plain.tokenizer.encode(text)
    params = SamplingParams(max_tokens=6, temperature=0.7, ignore_eos=True)
    n = 300
    runs = {}
    for name, llm in (("plain", plain), ("spec", spec)):
        runs[name] = _ids(llm.generate([ids] * n, params))
    assert spec.engine.stats().spec_accepted_tokens > n // 2  # drafts did much of the work
    for pos in (1, 3, 5):
        a = Counter(r[pos] for r in runs["plain"])
        b = Counter(r[pos] for r in runs["spec"])
        cats = [t for t in set(a) | set(b) if a[t] + b[t] >= 10]
        stat = 0.0
        for t in cats + [None]:  # the rare tokens pooled
            x = a[t] if t is not None else n - sum(a[c] for c in cats)
            y = b[t] if t is not None else n - sum(b[c] for c in cats)
            if x + y:
                stat += (x - y) ** 2 / (x + y)
        dof = len(cats)
        # p < 1e-4 for chi-square with `dof` degrees of freedom (Wilson-Hilferty bound)
        z = 3.72
        limit = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
        assert stat < limit, (pos, stat, limit, a.most_common(5), b.most_common(5))


def test_rejected_drafts_never_reach_the_prefix_cache(gguf_path, plain, prompts):
    """Every block the speculative engine publishes holds the KV plain decoding writes for the
    same tokens, bit for bit (each row is computed on its own on the native backend)."""
    spec = _spec()
    if spec.engine.runner.backend.name != "native-cpu":
        pytest.skip("bit-equal KV needs the native backend")
    fresh = LLM(gguf_path, kv_cache_memory="64MiB")
    spec.generate(prompts, GREEDY)
    assert spec.engine.stats().spec_draft_tokens > spec.engine.stats().spec_accepted_tokens
    fresh.generate(prompts, GREEDY)
    bs = spec.engine.kv.block_size
    a_pool, b_pool = spec.engine.kv.pool.cached, fresh.engine.kv.pool.cached
    shared = set(a_pool) & set(b_pool)
    assert len(shared) >= 60  # prompts and outputs: most blocks of both runs
    kv_a, kv_b = spec.engine.runner.kv_cache, fresh.engine.runner.kv_cache
    for h in shared:
        sa, sb = a_pool[h].block_id * bs, b_pool[h].block_id * bs
        assert torch.equal(kv_a[:, :, :, sa : sa + bs], kv_b[:, :, :, sb : sb + bs])


def test_stops_and_max_tokens_cut_inside_accepted_runs(plain, prompts, reference):
    spec = _spec()
    ids, ref = prompts[0], reference[0]
    text = plain.tokenizer.decode(ref)
    stop = text[len(text) // 2 : len(text) // 2 + 6]
    cut = SamplingParams(max_tokens=80, temperature=0.0, stop=[stop])
    got, want = spec.generate([ids], cut)[0].outputs[0], plain.generate([ids], cut)[0].outputs[0]
    assert (got.text, got.token_ids, got.finish_reason) == (want.text, want.token_ids, "stop")
    for n in (13, 29, 47):
        out = spec.generate([ids], SamplingParams(max_tokens=n, temperature=0.0))[0].outputs[0]
        assert out.token_ids == ref[:n] and out.finish_reason == "length"


def test_logprobs_are_the_targets(plain, prompts):
    spec = _spec()
    params = SamplingParams(max_tokens=40, temperature=0.0, logprobs=2)
    got = spec.generate(prompts[:2], params)
    want = plain.generate(prompts[:2], params)
    assert spec.engine.stats().spec_accepted_tokens > 0
    for g, w in zip(got, want):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        for lg, lw in zip(g.outputs[0].logprobs, w.outputs[0].logprobs):
            assert lg.keys() == lw.keys()
            for t in lg:
                assert lg[t] == pytest.approx(lw[t], abs=1e-5)


def test_the_cost_model_drafts_alone_and_pays(plain, prompts, reference):
    """Adaptive (the default): alone, on a prompt whose answer copies it, drafts are taken and
    kept; the output is plain decoding's."""
    spec = LLM(kv_cache_memory="64MiB", speculative="suffix")
    assert _ids(spec.generate([prompts[0]], GREEDY)) == reference[:1]
    stats = spec.engine.stats()
    assert stats.spec_accepted_tokens >= 20
    assert stats.spec_accepted_tokens / stats.spec_verifies >= 1.5  # tokens per verify, beyond 1


def test_a_request_can_opt_out(prompts):
    spec = _spec()
    params = SamplingParams(max_tokens=40, temperature=0.0, speculative=False)
    spec.generate(prompts[:2], params)
    assert spec.engine.stats().spec_draft_tokens == 0


def test_draft_model_greedy_equals_plain(gguf_path, prompts, reference):
    """The model drafting for itself: near-total acceptance, long accepted runs, the draft's KV
    catching up after each verify; batched, and tight enough to preempt."""
    for settings in ({}, {"kv_cache_memory": "12MiB", "max_num_batched_tokens": 48}):
        spec = _spec("draft", speculative_model=gguf_path, **settings)
        assert _ids(spec.generate(prompts, GREEDY)) == reference
        stats = spec.engine.stats()
        assert stats.spec_accepted_tokens >= 0.8 * stats.spec_draft_tokens > 100
    assert stats.preemptions > 0


def test_a_draft_model_of_other_shape_shares_the_block_tables(tmp_path, plain, prompts, reference):
    """A random 2-layer model with 2 KV heads of its own drafts (badly) for the real one: its KV
    has its own shape over the target's block ids, and the output is still the target's."""
    from tests.unit.test_hf_models import make_hf_dir

    make_hf_dir(tmp_path, plain, "llama", tie_word_embeddings=True)
    spec = _spec("draft", speculative_model=str(tmp_path))
    draft = spec.engine.speculator.proposer.runner
    assert draft.kv_cache.shape[0] == 2 and draft.spec.num_blocks == spec.engine.kv.num_blocks
    assert _ids(spec.generate(prompts[:3], GREEDY)) == reference[:3]
    assert spec.engine.stats().spec_draft_tokens > 100


def test_a_draft_model_needs_the_targets_vocabulary(tmp_path, plain):
    from slimserve.errors import ModelLoadError
    from tests.unit.test_hf_models import make_hf_dir

    make_hf_dir(tmp_path, plain, "llama", vocab_size=1000, tie_word_embeddings=True)
    with pytest.raises(ModelLoadError, match="vocabulary"):
        _spec("draft", speculative_model=str(tmp_path))
