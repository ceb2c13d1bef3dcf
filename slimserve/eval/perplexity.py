"""`slimserve eval perplexity`: sliding-window perplexity of a text under the engine's own forward
pass, including its weight format and its KV cache storage.

Each window of `window` tokens starts `stride` tokens after the previous one and scores only the
tokens the previous window did not, so every token after the first is scored once with at least
`window - stride` tokens of context (the first window's tokens with what precedes them). Windows
run as chunked prefill (`chunk` tokens per step): later chunks read earlier ones' keys and values
from the KV cache, as decoding does, so an int8 cache's rounding is part of the figure.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import torch

DEFAULT_TEXT = os.path.join(os.path.dirname(__file__), "us-founding-documents.txt")


def perplexity(llm, ids: list[int], window: int = 1024, stride: int = 512, chunk: int = 128):
    """(perplexity, tokens scored) of `ids`."""
    if stride < 1 or window < 2 or stride > window:
        raise ValueError(f"need 1 <= stride <= window and window >= 2, got {stride=}, {window=}")
    engine = llm.engine
    nll, scored, done = 0.0, 0, 1  # token 0 has nothing to be predicted from
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        with torch.inference_mode():
            logits = engine.prompt_logits(ids[begin:end], chunk=chunk)
        first = max(done, begin + 1)
        targets = torch.tensor(ids[first:end])
        logp = torch.log_softmax(logits[first - 1 - begin : end - 1 - begin].float(), dim=-1)
        nll -= logp.gather(1, targets.unsqueeze(1)).sum().item()
        scored += len(targets)
        done = end
        if end == len(ids):
            break
    return math.exp(nll / scored), scored


def run_perplexity(args) -> dict:
    from slimserve.bench.runinfo import describe_memory, engine_memory, run_info
    from slimserve.cli import make_llm
    from slimserve.errors import InvalidRequest

    path = args.text or DEFAULT_TEXT
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidRequest(f"cannot read --text {path}: {e}", param="text") from e
    llm = make_llm(args, progress=False)
    ids = llm.tokenizer.encode(text, add_special_tokens=False)
    if args.max_tokens_eval:
        ids = ids[: args.max_tokens_eval]
    if len(ids) < 2:
        raise InvalidRequest(f"{path} has fewer than 2 tokens", param="text")
    window = min(args.window, llm.engine.max_model_len)
    t0 = time.perf_counter()
    ppl, scored = perplexity(llm, ids, window, min(args.stride, window), args.chunk)
    result = {
        "text": os.path.basename(path),
        "tokens": len(ids),
        "tokens_scored": scored,
        "window": window,
        "stride": min(args.stride, window),
        "chunk": args.chunk,
        "perplexity": ppl,
        "seconds": time.perf_counter() - t0,
        "memory": engine_memory(llm.engine),
        **run_info(),
    }
    print(describe_memory(result["memory"]), file=sys.stderr)
    print(f"perplexity {ppl:.4f} over {scored} tokens of {result['text']} (window {window})")
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
    return result
