"""Several query rows of one request in one step (a verify of draft tokens) against the same
tokens fed one by one, on the real model, through both attention backends.

A proposer hands the engine drafts after each step; the engine schedules them as extra rows over
the request's block table, draws a token at every row, keeps the drafts the draws agree with and
credits only those. So the logits at every position, and the output, must be those of plain
decoding: bit for bit where every kernel is row-independent (the native backend), to float
rounding on the PyTorch path (a verify is one causal block there)."""

import pytest
import torch

from slimserve import LLM, SamplingParams, kernels
from slimserve.spec_decode import attach

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


class Oracle:
    """Proposes the continuation of a known output, with every `wrong`-th draft corrupted."""

    def __init__(self, output: list[int], k: int, wrong: int = 0):
        self.output, self.k, self.wrong, self.proposed = output, k, wrong, 0

    def propose(self, req, max_tokens):
        done = req.num_output_tokens
        drafts = self.output[done : done + min(self.k, max_tokens)]
        if self.wrong:
            drafts = [t + 1 if (done + j) % self.wrong == 0 else t for j, t in enumerate(drafts)]
        self.proposed += len(drafts)
        return drafts


def _run(llm, params, proposer=None):
    """Output token ids and the logits row at every position, in position order."""
    engine, logits = llm.engine, []
    compute = engine.model.compute_logits

    def record(hidden):
        logits.append(compute(hidden))
        return logits[-1]

    engine.model.compute_logits = record
    attach(engine, proposer)
    try:
        out = llm.generate([llm.tokenizer.encode(PROMPT)], params)[0].outputs[0]
    finally:
        del engine.model.compute_logits
        attach(engine, None)
    return out.token_ids, torch.cat(logits)


@pytest.fixture(scope="module")
def default_llm(gguf_path):
    return LLM(gguf_path, kv_cache_memory="64MiB", enable_prefix_caching=False)


@pytest.fixture(scope="module")
def sdpa_llm(gguf_path):
    from slimserve.config import CacheConfig, EngineConfig
    from slimserve.engine.engine import Engine

    llm = LLM.__new__(LLM)  # LLM over an engine built from a config of its own
    cache = CacheConfig(64 << 20, enable_prefix_caching=False)
    # float32 weights: PyTorch's int4 kernel rounds differently with the number of rows, and
    # this compares attention's two ways of computing a verify.
    llm.engine = Engine(EngineConfig(gguf_path, cache=cache, kernels="none", quantization="none"))
    llm.tokenizer = llm.engine.tokenizer
    return llm


GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def test_verify_rows_give_the_one_by_one_logits_bit_for_bit_natively(default_llm):
    if default_llm.engine.runner.backend.name != "native-cpu":
        pytest.skip("native kernels unavailable")
    tokens, plain = _run(default_llm, GREEDY)
    oracle = Oracle(tokens, k=5)
    step = default_llm.engine.runner.native_step
    before = step.steps if step is not None else 0
    spec_tokens, spec = _run(default_llm, GREEDY, oracle)
    assert oracle.proposed >= 15  # the rows really came k at a time
    assert spec.shape == plain.shape  # every accepted: one logits row per position
    assert torch.equal(spec, plain)
    assert spec_tokens == tokens
    if step is not None:  # verify steps ran through the fused native step
        assert step.steps > before


def test_verify_rows_give_the_one_by_one_logits_on_the_pytorch_path(sdpa_llm):
    assert sdpa_llm.engine.runner.backend.name == "torch-sdpa"
    tokens, plain = _run(sdpa_llm, GREEDY)
    spec_tokens, spec = _run(sdpa_llm, GREEDY, Oracle(tokens, k=4))
    assert spec_tokens == tokens
    torch.testing.assert_close(spec, plain, rtol=0, atol=2e-3 * plain.abs().max().item())


@pytest.mark.parametrize("fixture", ["default_llm", "sdpa_llm"])
def test_rejected_drafts_change_nothing_and_leak_nothing(fixture, request):
    llm = request.getfixturevalue(fixture)
    tokens, _ = _run(llm, GREEDY)
    oracle = Oracle(tokens, k=4, wrong=3)  # a wrong draft in every verify
    spec_tokens, _ = _run(llm, GREEDY, oracle)
    assert spec_tokens == tokens
    kv = llm.engine.kv
    assert kv.num_free_blocks == kv.num_blocks and not kv.req_blocks


def test_seeded_sampling_is_the_same_with_drafts(default_llm):
    """Drafts are accepted where the seeded draw agrees with them, so a seeded sampled output
    does not depend on what was proposed (engine/rejection.py)."""
    params = SamplingParams(max_tokens=24, temperature=0.8, top_p=0.95, seed=7, ignore_eos=True)
    tokens, _ = _run(default_llm, params)
    for oracle in (Oracle(tokens, k=4), Oracle(tokens, k=3, wrong=2)):
        assert _run(default_llm, params, oracle)[0] == tokens


def test_stop_inside_accepted_drafts_cuts_the_output(default_llm):
    tokens, _ = _run(default_llm, GREEDY)
    stop = SamplingParams(
        max_tokens=24, temperature=0.0, stop_token_ids=[tokens[9]], ignore_eos=True
    )
    plain, _ = _run(default_llm, stop)
    assert plain == tokens[: plain.index(tokens[9]) + 1]
    assert _run(default_llm, stop, Oracle(tokens, k=6))[0] == plain


def test_kernels_none_builds_the_pytorch_backend(sdpa_llm):
    assert sdpa_llm.engine.runner.native_step is None
    assert all(not m.native for m in sdpa_llm.engine.model.modules() if hasattr(m, "NATIVE"))
    if kernels.available():
        assert sdpa_llm.engine.config.kernels == "none"
