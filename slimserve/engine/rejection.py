"""Verifying speculative draft tokens so that the output keeps the target model's distribution.

Given the target's rows for positions p, p+1, ..., p+k (the last real token and k drafts after
it), `verify` returns the tokens to append: the accepted drafts, then one token drawn by the
target (a correction at the first rejected draft, or a bonus after all k).

Drafts without a distribution (n-gram or suffix lookup, a greedy draft model) are one-hot: draft
x is accepted with probability p(x), else a token is drawn from p with x removed. With the
exponential race that is exactly "accept x if the race at that row picks x, else take what the
race picked": the race picks x with probability p(x), and conditioned on not picking x it picks
y with probability p(y) / (1 - p(x)). So a row's token is the one plain sampling would draw, and a
seeded speculative run gives the same text as a seeded plain one, greedy or not.

Drafts sampled from a draft distribution q (a sampling draft model) take the standard rule:
accept x with probability min(1, p(x) / q(x)); at the first rejection draw from (p - q)+,
renormalised; after k acceptances draw the bonus from p.
"""

from __future__ import annotations

import torch

from slimserve.engine import noise
from slimserve.engine.sampler import SamplingRow


def verify(sampled: list[int], drafts: list[int]) -> list[int]:
    """One-hot drafts: `sampled` holds the target's draw at each of the k + 1 rows."""
    out = []
    for tok, draft in zip(sampled, drafts):
        out.append(tok)
        if tok != draft:
            return out
    out.append(sampled[len(drafts)])
    return out


def verify_with_probs(
    p: torch.Tensor, q: torch.Tensor, drafts: list[int], rows: list[SamplingRow]
) -> list[int]:
    """Drafts drawn from q: p (k + 1, V) the target's distributions at the k + 1 rows, q (k, V)
    the draft's at the k draft positions; rows give each row's seed and position (for the
    counter-based acceptance test and residual draw)."""
    k = len(drafts)
    idx = torch.tensor(drafts, dtype=torch.long).unsqueeze(1)
    p_x = p[:k].gather(1, idx).squeeze(1)
    q_x = q.gather(1, idx).squeeze(1)
    u = noise.uniform([noise.key(r.seed, r.position, noise.ACCEPT) for r in rows[:k]], 1)[:, 0]
    accept = (u * q_x < p_x).tolist()  # u < p / q without dividing by a zero q
    out = []
    for j, draft in enumerate(drafts):
        if not accept[j]:
            residual = (p[j] - q[j]).clamp_min_(0)
            if residual.sum() <= 0:  # p == q: any rejection is measure-zero; keep p
                residual = p[j]
            e = noise.exponential([noise.key(rows[j].seed, rows[j].position, noise.RESIDUAL)],
                                  p.shape[1])[0]  # fmt: skip
            out.append(int((residual / e).argmax()))
            return out
        out.append(draft)
    e = noise.exponential([noise.key(rows[k].seed, rows[k].position, noise.DRAW)], p.shape[1])[0]
    out.append(int((p[k] / e).argmax()))
    return out
