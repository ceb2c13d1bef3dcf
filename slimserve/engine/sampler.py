"""Token selection as a pipeline: logits processors (penalties now; a grammar mask or a logit
bias plug in the same way), then temperature, top-k, top-p, min-p and a draw.

A draw is the exponential race (argmax of p / E with E ~ Exp(1)), which picks token i with
probability p_i and needs no cumulative sum or host sync. The noise E is counter-based
(engine/noise.py): a pure function of the request's seed and the position being drawn, so the
same seed gives the same text whatever else shares the batch, however the prompt was chunked,
and with or without speculative decoding (engine/rejection.py).

One row is one position to draw: a decoding request has one; a request verifying k drafts has
k + 1, each with the history up to it (the drafts before it included).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from slimserve.engine import noise
from slimserve.kernels.argmax import argmax
from slimserve.sampling_params import SamplingParams


@dataclass(slots=True)
class SamplingRow:
    params: SamplingParams
    seed: int
    position: int  # absolute position of the token this row draws
    prompt_ids: list[int]
    tokens: list[int]  # its first `position` entries come before the draw (prompt, output, drafts)
    grammar: object | None = None  # the request's constraint (slimserve/structured.py), if any

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[len(self.prompt_ids) : self.position]


class LogitsProcessor(Protocol):
    """Changes the logits of some rows before selection; `applies` keeps the common batch free
    of work (a processor that applies to no row is skipped)."""

    def applies(self, row: SamplingRow) -> bool: ...

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor: ...


class Penalties:
    """vLLM/OpenAI semantics: repetition over prompt + output; presence/frequency over output."""

    def applies(self, row: SamplingRow) -> bool:
        return row.params.has_penalties

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        V = logits.shape[-1]
        logits = logits.clone()
        for i, r in enumerate(rows):
            p = r.params
            if not p.has_penalties:
                continue
            out_ids = torch.tensor(r.output_ids, dtype=torch.long)
            counts = torch.bincount(out_ids, minlength=V)[:V].to(logits.dtype)
            row = logits[i]
            if p.repetition_penalty != 1.0:
                seen = counts > 0
                seen[torch.tensor(r.prompt_ids, dtype=torch.long)] = True
                penalized = torch.where(
                    row > 0, row / p.repetition_penalty, row * p.repetition_penalty
                )
                row = torch.where(seen, penalized, row)
            row = (
                row - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).to(row.dtype)
            )
            logits[i] = row
        return logits


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[dict[int, float] | None]  # per row: sampled token and top-n alternatives


class Sampler:
    def __init__(
        self, processors: list[LogitsProcessor] | None = None, native_argmax: bool = False
    ):
        if processors is None:
            from slimserve.structured import GrammarMask

            processors = [Penalties(), GrammarMask()]  # the mask last: nothing lifts it
        self.processors = processors
        # the engine settles it once, with its other kernels (kernels.available("argmax"))
        self.native_argmax = native_argmax

    def __call__(self, logits: torch.Tensor, rows) -> SamplerOutput:
        """logits: (R, V) float32, one row per entry of `rows` (SamplingRows, or Requests, each
        drawing its next token)."""
        if not (rows and isinstance(rows[0], SamplingRow)):
            rows = as_rows(rows)
        params = [r.params for r in rows]
        want_logprobs = any(p.logprobs is not None for p in params)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
        logits = self.process(logits, rows)
        if all(p.greedy for p in params):
            tokens = argmax(logits, self.native_argmax)
        else:
            tokens = self._sample(logits, rows)
        token_ids = tokens.tolist()
        return SamplerOutput(token_ids, _gather_logprobs(raw_logprobs, token_ids, params))

    def prepare(self, rows: list[SamplingRow]) -> None:
        """Let processors start work that does not need the logits (a grammar's masks) while
        the step's forward runs."""
        for proc in self.processors:
            if hasattr(proc, "prepare"):
                proc.prepare(rows)

    def process(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """The logits after every processor that applies to some row."""
        for proc in self.processors:
            if any(proc.applies(r) for r in rows):
                logits = proc(logits, rows)
        return logits

    @staticmethod
    def probs(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """(R, V) the distribution each row draws from (processed logits in; greedy rows are
        one-hot at their argmax)."""
        params = [r.params for r in rows]
        temps = torch.tensor([1.0 if p.greedy else p.temperature for p in params])
        probs = filter_probs(logits / temps.unsqueeze(1), params)
        greedy = torch.tensor([p.greedy for p in params])
        if greedy.any():
            one_hot = torch.zeros_like(probs).scatter_(1, logits.argmax(-1, keepdim=True), 1.0)
            probs = torch.where(greedy.unsqueeze(1), one_hot, probs)
        return probs

    def _sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        params = [r.params for r in rows]
        greedy = torch.tensor([p.greedy for p in params])
        temps = torch.tensor([1.0 if p.greedy else p.temperature for p in params])
        probs = filter_probs(logits / temps.unsqueeze(1), params)
        keys = [noise.key(r.seed, r.position, noise.DRAW) for r in rows]
        race = probs / noise.exponential(keys, probs.shape[1], probs.device)
        sampled = argmax(race, self.native_argmax)
        return torch.where(greedy, argmax(logits, self.native_argmax), sampled)


def as_rows(rows) -> list[SamplingRow]:
    """SamplingRows as they are; a Request draws its next token after everything it holds."""
    out = []
    for r in rows:
        if not isinstance(r, SamplingRow):
            r = SamplingRow(r.params, r.seed, r.num_tokens, r.prompt_token_ids, r.all_token_ids,
                            getattr(r, "grammar", None))  # fmt: skip
        out.append(r)
    return out


def filter_probs(logits: torch.Tensor, params) -> torch.Tensor:
    """Softmax restricted to each row's top-k, top-p nucleus and min-p floor (others get 0)."""
    V = logits.shape[-1]
    top_k = [min(p.top_k, V) if p.top_k > 0 else V for p in params]
    top_p = [p.top_p for p in params]
    min_p = [p.min_p for p in params]
    if any(k < V for k in top_k) or any(p < 1.0 for p in top_p):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        keep = torch.ones_like(sorted_logits, dtype=torch.bool)
        ks = torch.tensor(top_k).unsqueeze(1)
        keep &= torch.arange(V).unsqueeze(0) < ks
        sorted_probs = torch.softmax(sorted_logits.masked_fill(~keep, float("-inf")), dim=-1)
        # Keep a token if the mass strictly before it is below top_p (so the first always stays).
        before = sorted_probs.cumsum(dim=-1) - sorted_probs
        keep &= before < torch.tensor(top_p).unsqueeze(1)
        mask = torch.zeros_like(keep).scatter_(1, order, keep)
        logits = logits.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if any(m > 0.0 for m in min_p):
        floor = torch.tensor(min_p).unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < floor, 0.0)
    return probs


def _gather_logprobs(raw: torch.Tensor | None, token_ids: list[int], params):
    if raw is None:
        return [None] * len(token_ids)
    out = []
    for i, (tok, p) in enumerate(zip(token_ids, params)):
        if p.logprobs is None:
            out.append(None)
            continue
        entry = {tok: raw[i, tok].item()}
        if p.logprobs:
            vals, ids = raw[i].topk(p.logprobs)
            entry.update(zip(ids.tolist(), vals.tolist()))
        out.append(entry)
    return out
