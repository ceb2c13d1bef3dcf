"""Benchmark workloads as token-id prompts, seeded so that every engine gets the same ones."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np


@dataclass
class BenchRequest:
    prompt: list[int] | str
    prompt_tokens: int
    output_tokens: int


def random_requests(
    n: int, input_len: int, output_len: int, vocab: int, seed: int = 0, range_ratio: float = 0.0
) -> list[BenchRequest]:
    """Random token prompts; lengths uniform in [len * (1 - ratio), len * (1 + ratio)]."""
    rng = np.random.default_rng(seed)

    def length(base):
        lo, hi = max(1, int(base * (1 - range_ratio))), max(1, int(base * (1 + range_ratio)))
        return int(rng.integers(lo, hi + 1))

    out = []
    for _ in range(n):
        k = length(input_len)
        out.append(BenchRequest(rng.integers(100, vocab - 100, k).tolist(), k, length(output_len)))
    return out


def shared_prefix_requests(
    groups: int,
    per_group: int,
    prefix_len: int,
    question_len: int,
    output_len: int,
    vocab: int,
    seed: int = 0,
) -> list[BenchRequest]:
    """G groups x P prompts: each group shares a system prompt of prefix_len tokens; groups are
    interleaved, as many tenants' requests arrive at a shared server."""
    rng = np.random.default_rng(seed)
    prefixes = [rng.integers(100, vocab - 100, prefix_len).tolist() for _ in range(groups)]
    out = []
    for _ in range(per_group):
        for prefix in prefixes:
            q = rng.integers(100, vocab - 100, question_len).tolist()
            out.append(BenchRequest(prefix + q, prefix_len + question_len, output_len))
    return out


def file_requests(path: str, output_len: int) -> list[BenchRequest]:
    """A JSONL file of {"prompt": str | [ids], "output_len"?: int}; token counts come from usage."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                p = row["prompt"]
                out.append(
                    BenchRequest(
                        p,
                        len(p) if isinstance(p, list) else 0,
                        int(row.get("output_len", output_len)),
                    )
                )
    return out


def arrival_times(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Send offsets in seconds: a Gamma process with mean rate `rate` (burstiness 1 = Poisson;
    below 1 burstier, above 1 more regular). rate = inf sends everything at once."""
    if rate == float("inf"):
        return [0.0] * n
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)
    return np.cumsum(gaps).tolist()


@dataclass
class Conversation:
    """Turns sent one after another, each resending the whole history, as chat apps do."""

    turns: list[BenchRequest]


def multi_turn_conversations(
    n: int,
    turns: int,
    system_len: int,
    user_len: int,
    reply_len: int,
    output_len: int,
    vocab: int,
    seed: int = 0,
) -> list[Conversation]:
    """n conversations of `turns` turns. The earlier assistant replies in each history are fixed
    random tokens (not the server's answers), so every engine sees the same prompts."""
    rng = np.random.default_rng(seed)

    def rand(k):
        return rng.integers(100, vocab - 100, k).tolist()

    out = []
    for _ in range(n):
        history = rand(system_len)
        convo = []
        for _ in range(turns):
            history = history + rand(user_len)
            convo.append(BenchRequest(list(history), len(history), output_len))
            history = history + rand(reply_len)
        out.append(Conversation(convo))
    return out
