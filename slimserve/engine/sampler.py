"""Token selection: penalties, temperature, top-k, top-p, min-p, then a seeded draw.

Sampling uses the exponential race (argmax of p / E with E ~ Exp(1)), which picks token i with
probability p_i and needs no cumulative sum or host sync; each seeded request draws its noise from
its own generator, so the same seed gives the same text whatever else shares the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimserve.engine.request import Request


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[dict[int, float] | None]  # per row: sampled token and top-n alternatives


class Sampler:
    def __call__(self, logits: torch.Tensor, reqs: list[Request]) -> SamplerOutput:
        """logits: (S, V) float32, one row per request in `reqs`."""
        params = [r.params for r in reqs]
        want_logprobs = any(p.logprobs is not None for p in params)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
        if any(p.has_penalties for p in params):
            logits = apply_penalties(logits.clone(), reqs)
        if all(p.greedy for p in params):
            tokens = logits.argmax(dim=-1)
        else:
            tokens = self._sample(logits, reqs)
        token_ids = tokens.tolist()
        return SamplerOutput(token_ids, _gather_logprobs(raw_logprobs, token_ids, params))

    def _sample(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        params = [r.params for r in reqs]
        greedy = torch.tensor([p.greedy for p in params])
        temps = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params])
        probs = filter_probs(logits / temps.unsqueeze(1), params)
        noise = torch.empty_like(probs)
        for i, r in enumerate(reqs):
            noise[i].exponential_(generator=r.generator)
        sampled = (probs / noise.clamp_min_(1e-10)).argmax(dim=-1)
        return torch.where(greedy, logits.argmax(dim=-1), sampled)


def filter_probs(logits: torch.Tensor, params) -> torch.Tensor:
    """Softmax restricted to each row's top-k, top-p nucleus and min-p floor (others get 0)."""
    V = logits.shape[-1]
    top_k = [p.top_k if p.top_k > 0 else V for p in params]
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


def apply_penalties(logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
    """vLLM/OpenAI semantics: repetition over prompt + output; presence/frequency over output."""
    V = logits.shape[-1]
    for i, r in enumerate(reqs):
        p = r.params
        if not p.has_penalties:
            continue
        out_ids = torch.tensor(r.output_token_ids, dtype=torch.long)
        counts = torch.bincount(out_ids, minlength=V)[:V].to(logits.dtype)
        row = logits[i]
        if p.repetition_penalty != 1.0:
            seen = counts > 0
            seen[torch.tensor(r.prompt_token_ids, dtype=torch.long)] = True
            penalized = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
            row = torch.where(seen, penalized, row)
        row = row - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).to(row.dtype)
        logits[i] = row
    return logits


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
