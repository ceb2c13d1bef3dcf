"""Deciding, each step, which drafts are worth verifying: speculative decoding that pays for
itself or stays off.

A draft token costs one more query row in the next step and earns one token if it and every
draft before it are accepted. With the step's time modelled as `a + b * rows` (fitted online from
the engine's own steps, `StepCost`) and each draft's chance of acceptance estimated (`p`), the
tokens a second of the next step yields rise with a draft exactly when p / b > E / T, E being the
tokens the step already expects and T its time. So drafts are taken best first while that holds.
At batch 1 a decode is mostly the weights' read (a >> b), and a draft pays at p above ~0.25 here;
at batch 32 the step is mostly compute and only near-certain drafts (p ~0.9) are taken: the
engine drafts less as the batch grows without a threshold to tune.

A draft's p is the product, over it and the drafts before it, of the proposer's confidence and
the request's own acceptance rate: a Beta-style estimate from its recent verifies, with the rate
of all requests' drafts of similar evidence (the match length) as its prior. A request whose drafts
keep failing stops drafting; its own record fades a little each step it does not draft, back
towards the prior, so it tries again later.
"""

from __future__ import annotations

from dataclasses import dataclass

from slimserve.core.request import Request
from slimserve.spec_decode.index import Match

_PRIOR_WEIGHT = 4.0  # how many of a request's own verified drafts the shared prior counts for
_DECAY = 0.8  # per verify (and per step without drafts) on a request's own record
_PRIOR = 0.7  # before any verify: roughly what drafts from a 2-token match get on chat text
# The shared records keep ~200 steps of evidence and fade back to the prior as it ages, so that
# a bad start (drafts early in the answers, say) does not switch drafting off for good.
_SHARED_DECAY = 0.995


@dataclass(slots=True)
class DraftRecord:
    """A request's recent drafts: accepted tokens and trials (accepted plus rejections)."""

    accepted: float = 0.0
    trials: float = 0.0


class StepCost:
    """Step time as `a + b * rows`, by exponentially weighted least squares over recent steps,
    pulled towards b = 0.3 a (measured for the default model here) while the rows hardly vary."""

    def __init__(self, decay: float = 0.98, prior_ratio: float = 0.3):
        self.decay, self.prior_ratio = decay, prior_ratio
        self.w = self.x = self.y = self.xx = self.xy = 0.0

    def observe(self, rows: int, seconds: float) -> None:
        d = self.decay
        self.w = self.w * d + 1
        self.x = self.x * d + rows
        self.y = self.y * d + seconds
        self.xx = self.xx * d + rows * rows
        self.xy = self.xy * d + rows * seconds

    def fit(self) -> tuple[float, float]:
        if self.w == 0:
            return 1.0, self.prior_ratio
        mx, my = self.x / self.w, self.y / self.w
        var, cov = self.xx / self.w - mx * mx, self.xy / self.w - mx * my
        b0 = self.prior_ratio * my / (1 + self.prior_ratio * mx)
        lam = 4.0  # the prior weighs as much as rows spread over +-2
        b = max((cov + lam * b0) / (max(var, 0.0) + lam), 0.05 * b0)
        return max(my - b * mx, b), b


class Speculator:
    """The proposer, the decision of what to verify, and the counters for /metrics."""

    def __init__(self, proposer, max_tokens: int, budget: int, adaptive: bool = True):
        self.proposer, self.max_tokens, self.budget = proposer, max_tokens, budget
        self.adaptive = adaptive
        self.cost = StepCost()
        self._shared: dict[int, DraftRecord] = {}  # by log2 of the match length
        self.num_drafts = self.num_accepted = self.num_verifies = 0

    # -- before a step ------------------------------------------------------------------------
    def plan(self, ready: list[tuple[Request, int]]) -> None:
        """Set `spec_token_ids` of each `(request, room)` about to decode: room is how many more
        tokens it may take in all (max_tokens, context), so a draft leaves one for the bonus."""
        for rec in self._shared.values():
            rec.accepted = (
                rec.accepted * _SHARED_DECAY + (1 - _SHARED_DECAY) * _PRIOR_WEIGHT * _PRIOR
            )
            rec.trials = rec.trials * _SHARED_DECAY + (1 - _SHARED_DECAY) * _PRIOR_WEIGHT
        a, b = self.cost.fit()
        expected, step = float(len(ready)), a + b * len(ready)
        rows = len(ready)
        batched = hasattr(self.proposer, "propose_batch")
        # A draft model's tokens cost its own forward too (sunk by the time they are offered).
        per_draft = b + ((self.proposer.seconds_per_token or b) if batched else 0.0)
        wanted = []  # (request's place, request, cap)
        for i, (req, room) in enumerate(ready):
            cap = min(self.max_tokens, room - 1)
            rate = self._rate(req, None) if self.adaptive else 1.0
            if cap < 1 or (self.adaptive and rate * step <= per_draft * expected):
                self._fade(req)
                continue  # even a certain-looking draft would not pay now
            if batched and self.adaptive:
                cap = _worth(rate, cap, expected, step, per_draft)
            wanted.append((i, req, cap))
        if batched:
            found = self.proposer.propose_batch([(req, cap) for _, req, cap in wanted])
        else:
            found = [self._propose(req, cap) for _, req, cap in wanted]
        offers, matches = [], {}  # offers: (-p, request's place, draft's place)
        for (i, req, _), match in zip(wanted, found):
            matches[i] = match
            # A draft model's confidence is its probability; a lookup's is a frequency, scaled
            # by how often this request's drafts have been right.
            rate = self._rate(req, match) if self.adaptive and not batched else 1.0
            p = 1.0
            for j, c in enumerate(match.confidence):
                p *= c * rate
                offers.append((-p, i, j))
        if self.adaptive:
            offers.sort()
        take: dict[int, int] = {}
        for neg_p, i, j in offers:
            if rows >= self.budget:
                break
            p = -neg_p
            if self.adaptive and p * step <= b * expected:
                break
            if take.get(i, 0) == j:  # drafts of a request are taken in order
                take[i] = j + 1
                expected, step, rows = expected + p, step + b, rows + 1
        for i, (req, _) in enumerate(ready):
            n = take.get(i, 0)
            req.spec_token_ids = matches[i].tokens[:n] if n else []
            if not n:
                self._fade(req)

    def _propose(self, req: Request, cap: int) -> Match:
        """A per-request proposer's drafts, as a Match."""
        found = self.proposer.propose(req, cap)
        if isinstance(found, Match):
            del found.tokens[cap:], found.confidence[cap:]
            return found
        tokens = list(found)[:cap]  # a plain list of drafts: taken as certain
        return Match(tokens, [1.0] * len(tokens), len(tokens))

    # -- after a step -------------------------------------------------------------------------
    def observe_step(self, rows: int, seconds: float) -> None:
        self.cost.observe(rows, seconds)

    def observe(self, req: Request, drafted: int, accepted: int) -> None:
        """A verify of `drafted` tokens kept `accepted` of them."""
        if not drafted:
            return
        self.num_drafts += drafted
        self.num_accepted += accepted
        self.num_verifies += 1
        trials = accepted + (accepted < drafted)
        rec = req.draft_record or DraftRecord()
        req.draft_record = rec
        rec.accepted = rec.accepted * _DECAY + accepted
        rec.trials = rec.trials * _DECAY + trials
        shared = self._shared.setdefault(
            req.draft_evidence, DraftRecord(_PRIOR_WEIGHT * _PRIOR, _PRIOR_WEIGHT)
        )
        shared.accepted += accepted
        shared.trials += trials

    def finished(self, req: Request) -> None:
        self.proposer.finished(req)

    # -- estimates ----------------------------------------------------------------------------
    def _rate(self, req: Request, match: Match | None) -> float:
        """The request's chance that a draft token is accepted (given the ones before it were),
        for a draft found on `match` (None: the best any match could give)."""
        if match is None:
            prior = max((r.accepted / r.trials for r in self._shared.values()), default=_PRIOR)
        else:
            req.draft_evidence = max(match.match_len, 1).bit_length()
            shared = self._shared.get(req.draft_evidence)
            prior = shared.accepted / shared.trials if shared else _PRIOR
        rec = req.draft_record
        if rec is None:
            return prior
        return (rec.accepted + _PRIOR_WEIGHT * prior) / (rec.trials + _PRIOR_WEIGHT)

    @staticmethod
    def _fade(req: Request) -> None:
        rec = req.draft_record
        if rec is not None:
            rec.accepted *= _DECAY
            rec.trials *= _DECAY


def _worth(rate: float, cap: int, expected: float, step: float, cost: float) -> int:
    """How many drafts of acceptance `rate` each would pay for their `cost` in a step now
    expecting `expected` tokens in `step` seconds (a draft model drafts no more than this)."""
    n, p = 0, 1.0
    while n < cap:
        p *= rate
        if p * step <= cost * expected:
            break
        expected, step, n = expected + p, step + cost, n + 1
    return n
