"""Priority scheduling on the real default model: a better-priority arrival displaces running
requests, and every request still gives the tokens it gives alone."""

import torch

from slimserve import LLM, SamplingParams


def test_displaced_requests_finish_with_the_same_tokens(gguf_path):
    llm = LLM(gguf_path, kv_cache_memory="64MiB", max_num_seqs=2)
    engine = llm.engine
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(100, 40000, (60,), generator=g).tolist() for _ in range(3)]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    want = [llm.generate([p], params)[0].outputs[0].token_ids for p in prompts]
    low = [engine.add_request(p, params, priority=10) for p in prompts[:2]]
    for _ in range(4):
        engine.step()
    high = engine.add_request(prompts[2], params, priority=-5)
    outs, first_high, steps = {}, None, 0
    while engine.has_unfinished():
        steps += 1
        for out in engine.step():
            if out.request_id == high and first_high is None and out.outputs[0].token_ids:
                first_high = steps
            if out.finished:
                outs[out.request_id] = out.outputs[0].token_ids
    assert [outs[r] for r in low + [high]] == want
    assert engine.stats().preemptions >= 1
    assert first_high == 1  # its first token in the very next step, not after the others
