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
