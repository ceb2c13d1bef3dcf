"""Greedy output does not depend on what else runs, with the default settings.

The default model (int4 weights, bf16 KV cache, native kernels): every row's arithmetic is its
own (backends/native_cpu.py), so a request's logits are equal bit for bit whether its prompt runs
whole or in chunks, alone or batched, computed or read from the prefix cache, prefilled or
decoded. Before, prompt chunks went through PyTorch SDPA, whose blocking follows the chunk's
shape, and one answer in a batch of 32 concurrent chats came out different."""

import pytest
import torch

from slimserve import LLM, SamplingParams, kernels

pytestmark = pytest.mark.skipif(
    not kernels.available("paged_decode_attention"), reason="native kernels unavailable"
)

QUESTIONS = [
    "Who wrote Hamlet?",
    "Count from 3 to 8.",
    "What is the capital of France?",
    "Write a haiku about rain.",
    "Explain what a prime number is, with three examples.",
]


def chats(llm):
    return [llm.tokenizer.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]


def tokens_and_logprobs(outs):
    return [(o.outputs[0].token_ids, [d for d in o.outputs[0].logprobs]) for o in outs]


GREEDY = SamplingParams(max_tokens=40, temperature=0.0, logprobs=3)


@pytest.fixture(scope="module")
def default_llm(gguf_path):
    return LLM(gguf_path, kv_cache_memory="128MiB")


@pytest.fixture(scope="module")
def chunked_cold_llm(gguf_path):
    """The reference: no prefix cache, and prompts cut into chunks of 7 tokens."""
    return LLM(
        gguf_path, kv_cache_memory="128MiB", max_num_batched_tokens=7, enable_prefix_caching=False
    )


def test_prompt_logits_do_not_depend_on_chunking(default_llm):
    e = default_llm.engine
    ids = default_llm.tokenizer.encode(chats(default_llm)[4])
    whole = e.prompt_logits(ids)
    for chunk in (1, 7, 16, 33):
        assert torch.equal(e.prompt_logits(ids, chunk=chunk), whole), chunk


def test_greedy_request_alone_equals_it_batched_cached_and_chunked(default_llm, chunked_cold_llm):
    prompts = chats(default_llm)
    alone = tokens_and_logprobs(
        [chunked_cold_llm.generate([p], GREEDY, use_tqdm=False)[0] for p in prompts]
    )
    # Three copies of each, all at once: batched decodes, shared system-prompt blocks, and (from
    # the second copy on) prompts read from the prefix cache.
    batch = tokens_and_logprobs(default_llm.generate(prompts * 3, GREEDY, use_tqdm=False))
    assert batch == alone * 3
    again = tokens_and_logprobs(default_llm.generate(prompts[::-1], GREEDY, use_tqdm=False))
    assert again == alone[::-1]


def test_prefilled_positions_equal_decoded_ones(default_llm):
    """A generated token's logits, decoded one at a time, equal those of the same position run as
    a prompt: what a preempted request's recompute or a later chat turn computes."""
    prompt = default_llm.tokenizer.encode(chats(default_llm)[1])
    out = default_llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0]
    logits = default_llm.engine.prompt_logits(prompt + out.token_ids[:-1], chunk=16)
    decoded = torch.log_softmax(logits[len(prompt) - 1 :], dim=-1)
    for row, tok, lp in zip(decoded, out.token_ids, out.logprobs):
        assert row.argmax().item() == tok
        assert row[tok].item() == lp[tok]
