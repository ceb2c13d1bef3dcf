"""Scoring text with the engine: the logits of a whole sequence (evaluation, reference tests) and
the prompt logprobs a request asks for (SamplingParams.prompt_logprobs)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from slimserve.core.plan import build_plan
from slimserve.core.request import Request
from slimserve.errors import CapacityError
from slimserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from slimserve.engine.model_runner import ModelRunner
    from slimserve.engine.scheduler import Scheduler


@torch.inference_mode()
def prompt_logits(
    scheduler: Scheduler, runner: ModelRunner, block_size: int, rid, token_ids: list[int],
    chunk: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """(T, V) logits at every position of one sequence, for evaluation and reference tests.

    With `chunk`, the sequence runs as chunked prefill: each chunk attends to the earlier
    ones through the KV cache, so the cache's storage (e.g. int8) shows in the logits.
    Reserves free KV blocks under `rid` (an id no client request uses) through the scheduler
    for the duration of the call and gives them back."""
    n = len(token_ids)
    req = Request(rid, None, list(token_ids), SamplingParams(), frozenset())
    if not scheduler.reserve(rid, n):
        raise CapacityError(f"{n} tokens do not fit the free KV cache")
    out = []
    try:
        for start in range(0, n, chunk or n):
            req.num_computed_tokens = start
            size = min(chunk or n, n - start)
            tables = {rid: scheduler.kv.tables(rid)}
            plan = build_plan([(req, size)], tables, block_size, all_logits=True)
            out.append(runner.execute(plan))
        return torch.cat(out)
    finally:
        scheduler.release(rid)


def score_prompt(req: Request, start: int, logits: torch.Tensor) -> None:
    """Append the logprobs that rows `start`, `start + 1`, ... give the prompt tokens after
    them (with the request's number of top alternatives); positions it already holds (rows run
    again after a preemption) are skipped."""
    k = req.params.prompt_logprobs
    first = start + 1  # the token row 0 scores
    skip = len(req.prompt_logprobs) - first  # >= 0: the scheduler leaves no gap
    if skip >= len(logits):
        return
    logprobs = torch.log_softmax(logits[skip:].float(), dim=-1)
    targets = req.prompt_token_ids[first + skip : first + len(logits)]
    chosen = logprobs.gather(1, torch.tensor(targets).unsqueeze(1)).squeeze(1).tolist()
    top = logprobs.topk(k) if k else None
    for r, (tok, lp) in enumerate(zip(targets, chosen)):
        entry = {tok: lp}
        if top is not None:
            entry.update(zip(top.indices[r].tolist(), top.values[r].tolist()))
        req.prompt_logprobs.append(entry)
