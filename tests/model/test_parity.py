"""The real model against transformers loading the same GGUF: logits and greedy text."""

import pytest
import torch

from slimserve import SamplingParams

LONG_TEXT = (
    "The history of computing is a story of abstraction layered on abstraction. "
    "Early machines were programmed by rewiring panels; then came stored programs, assemblers, "
    "compilers, operating systems and networks. Each layer hid the one below it, letting people "
    "think about larger problems. "
)

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Ünïcödé tëxt, emoji 🎉🚀 and numbers 1234567890: ",
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
    LONG_TEXT * 22,  # > 1,000 tokens
]

CHATS = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "Explain photosynthesis to a child.",
    "List three prime numbers greater than 100.",
    "Translate 'good morning' into Spanish and German.",
]


def hf_logits(hf_model, ids):
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("prompt", PROMPTS, ids=range(len(PROMPTS)))
def test_logits_match_transformers(llm, hf_model, hf_tokenizer, prompt):
    ids = hf_tokenizer(prompt, add_special_tokens=False).input_ids
    if prompt is PROMPTS[-1]:
        assert len(ids) >= 1000
    ours = llm.engine.prompt_logits(ids)
    ref = hf_logits(hf_model, ids)
    assert ours.shape == ref.shape
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))
    assert (ours - ref).abs().max().item() <= 1e-3


def hf_greedy(hf_model, ids, n):
    """A plain greedy loop (no EOS handling), so both sides produce exactly n tokens."""
    out = []
    with torch.no_grad():
        res = hf_model(torch.tensor([ids]), use_cache=True)
        for _ in range(n):
            tok = int(res.logits[0, -1].argmax())
            out.append(tok)
            res = hf_model(
                torch.tensor([[tok]]), past_key_values=res.past_key_values, use_cache=True
            )
    return out


@pytest.mark.parametrize("question", CHATS, ids=range(len(CHATS)))
def test_greedy_generation_matches_transformers(llm, hf_model, hf_tokenizer, question):
    messages = [{"role": "user", "content": question}]
    prompt = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = hf_tokenizer(prompt, add_special_tokens=False).input_ids
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    ours = llm.generate([ids], params)[0].outputs[0].token_ids
    assert ours == hf_greedy(hf_model, ids, 64)


def check_prompt_logprobs(entries, ids, ref_logits, k):
    """`entries` (an output's prompt_logprobs) against log_softmax of reference logits."""
    ref = torch.log_softmax(ref_logits, dim=-1)
    assert len(entries) == len(ids) and entries[0] is None
    for p in range(1, len(ids)):
        e = entries[p]
        assert abs(e[ids[p]] - ref[p - 1, ids[p]].item()) <= 1e-3
        assert len(e) in (k, k + 1)  # the prompt token and k alternatives (it may be one)
        if not k:
            continue
        top = ref[p - 1].topk(k)
        assert ref[p - 1].argmax().item() in e
        for tok, lp in e.items():
            assert abs(lp - ref[p - 1, tok].item()) <= 1e-3
            assert tok == ids[p] or lp >= top.values[-1].item() - 1e-3


def test_prompt_logprobs_match_transformers(gguf_path, hf_model, hf_tokenizer):
    # Prompt chunks of 16 rows scored as they run, beside a request that draws tokens in the
    # same steps; asked twice, so the second run finds the prompt in the prefix cache and must
    # compute it anyway.
    from slimserve import LLM

    chunked = LLM(gguf_path, kv_cache_memory="64MiB", quantization="none",
                  kv_cache_dtype="float32", max_num_batched_tokens=16)  # fmt: skip
    ids = hf_tokenizer(PROMPTS[1] + PROMPTS[0] * 5, add_special_tokens=False).input_ids
    ref = hf_logits(hf_model, ids)
    other = hf_tokenizer("Once upon a time", add_special_tokens=False).input_ids
    scored = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=3)
    for _ in range(2):
        outs = chunked.generate(
            [other, ids], [SamplingParams(max_tokens=24, temperature=0), scored]
        )
        assert outs[0].prompt_logprobs is None
        check_prompt_logprobs(outs[1].prompt_logprobs, ids, ref, 3)
        assert outs[1].outputs[0].token_ids[0] == ref[-1].argmax().item()
    kv = chunked.engine.kv
    assert kv.stats.hits == 0  # cached, but the scored runs computed it all
    chunked.generate([ids], SamplingParams(max_tokens=1))
    assert kv.stats.hits >= len(ids) - 16  # an unscored request takes the cached blocks


def test_prompt_logprobs_survive_preemption(gguf_path, llm):
    # 24 blocks of 16 tokens for 4 requests of 150 + 32 tokens: some are preempted, mid-prompt
    # (chunks of 64) or decoding, and recomputed; each prompt is scored once, position by
    # position, as when it runs alone.
    from slimserve import LLM

    spec = llm.engine.kv_spec
    small = LLM(gguf_path, quantization="none", kv_cache_dtype="float32",
                kv_cache_memory=24 * spec.block_size * spec.bytes_per_token,
                max_num_batched_tokens=64)  # fmt: skip
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(100, 40000, (150,), generator=g).tolist() for _ in range(4)]
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True, prompt_logprobs=0)
    outs = small.generate(prompts, [params] * 4)
    assert small.engine.stats().preemptions > 0
    for ids, out in zip(prompts, outs):
        check_prompt_logprobs(out.prompt_logprobs, ids, llm.engine.prompt_logits(ids), 0)
