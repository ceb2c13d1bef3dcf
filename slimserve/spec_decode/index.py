"""Where the recent tokens occurred before, and what followed them: the lookup behind both
model-free proposers.

A `TokenIndex` maps every 2-gram and 4-gram of a token list to the positions where it ends, and
grows as the list grows (a request's prompt and output, or the global buffer of finished
outputs). A lookup takes the last tokens of a context, finds the earlier places whose preceding
tokens match them for the longest stretch (up to `max_match`), and reads on from there. It is a
depth-limited suffix tree in effect, without the tree: the keys narrow the candidates, and slice
comparisons (C speed) measure how far back each one agrees.

Continuations are scored the way SuffixDecoding scores a suffix-tree path: at each depth the
token most of the surviving occurrences continue with, and the fraction that do (the draft's
`confidence` there); occurrences that continue differently drop out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SEPARATOR = -1  # between documents of one index: never matched, never drafted
_SHIFT = 20  # token ids fit in 20 bits for every vocabulary we load; keys stay exact ints
_MAX_CANDIDATES = 64  # most recent occurrences of a key examined per lookup


def _key2(t: list[int], i: int) -> int:
    return (t[i - 1] << _SHIFT) | t[i]


def _key4(t: list[int], i: int) -> int:
    return (((((t[i - 3] << _SHIFT) | t[i - 2]) << _SHIFT) | t[i - 1]) << _SHIFT) | t[i]


@dataclass(slots=True)
class Match:
    """A lookup's result: the draft, each token's confidence, and how long a stretch of the
    context matched where it was found (the evidence behind it)."""

    tokens: list[int] = field(default_factory=list)
    confidence: list[float] = field(default_factory=list)
    match_len: int = 0

    @property
    def score(self) -> float:
        """Expected number of draft tokens accepted if confidences were probabilities."""
        total, p = 0.0, 1.0
        for c in self.confidence:
            p *= c
            total += p
        return total


class TokenIndex:
    """Positions of the 2- and 4-grams of `tokens` (a list this index may share with its owner:
    it reads it, never writes it) for positions below `indexed`."""

    def __init__(self, tokens: list[int] | None = None):
        self.tokens = tokens if tokens is not None else []
        self.indexed = 0
        self._at2: dict[int, list[int]] = {}
        self._at4: dict[int, list[int]] = {}

    def extend_to(self, n: int) -> None:
        """Index positions below `n` (the owner appended to `tokens`)."""
        t, at2, at4 = self.tokens, self._at2, self._at4
        for i in range(max(self.indexed, 1), n):
            if t[i] < 0 or t[i - 1] < 0:
                continue
            at2.setdefault(_key2(t, i), []).append(i)
            if i >= 3 and min(t[i - 3], t[i - 2]) >= 0:
                at4.setdefault(_key4(t, i), []).append(i)
        self.indexed = max(self.indexed, n)

    def candidates(self, ctx: list[int]) -> list[int]:
        """Indexed positions whose 4-gram (else 2-gram) equals the end of `ctx`, newest first."""
        e = len(ctx) - 1
        if e >= 3:
            found = self._at4.get(_key4(ctx, e))
            if found:
                return found[-1 : -_MAX_CANDIDATES - 1 : -1]
        if e >= 1:
            found = self._at2.get(_key2(ctx, e))
            if found:
                return found[-1 : -_MAX_CANDIDATES - 1 : -1]
        return []

    def lookup(
        self, ctx: list[int], max_tokens: int, max_match: int = 64, newest: bool = False
    ) -> Match:
        """A draft of up to `max_tokens` to follow `ctx`.

        Occurrences are those whose preceding tokens agree with the end of `ctx` for the longest
        stretch found (at least 2). With `newest`, the draft follows the most recent of them
        alone (prompt lookup); otherwise it follows the majority at each depth. A continuation
        that runs into the end of `ctx` itself goes on through the draft (a repeating run)."""
        cands = self.candidates(ctx)
        if not cands or max_tokens <= 0:
            return Match()
        t, e = self.tokens, len(ctx) - 1
        best, occ = 0, []
        for c in cands:
            if c == e and t is ctx:
                continue  # the context's own end
            m = _agreement(t, c, ctx, e, min(max_match, c + 1, e + 1))
            if m > best:
                best, occ = m, [c]
            elif m == best:
                occ.append(c)
        if best < 2:
            return Match()
        if newest:
            occ = occ[:1]
        out = Match(match_len=best)
        draft = out.tokens
        limit = len(t) if t is not ctx else None
        for d in range(1, max_tokens + 1):
            counts: dict[int, int] = {}
            for c in occ:
                tok = _at(t, c + d, ctx, e, draft, limit)
                if tok >= 0:
                    counts[tok] = counts.get(tok, 0) + 1
            if not counts:
                break
            tok, n = max(counts.items(), key=lambda kv: kv[1])
            out.confidence.append(n / len(occ))
            draft.append(tok)
            occ = [c for c in occ if _at(t, c + d, ctx, e, draft, limit) == tok]
        return out


def _at(t: list[int], i: int, ctx: list[int], e: int, draft: list[int], limit: int | None) -> int:
    """Token `i` of the indexed list, where a list that is the context itself continues with the
    draft; SEPARATOR past the end."""
    if limit is not None:
        return t[i] if i < limit else SEPARATOR
    if i <= e:
        return t[i]
    j = i - e - 1
    return draft[j] if j < len(draft) else SEPARATOR


def _agreement(a: list[int], ea: int, b: list[int], eb: int, hi: int) -> int:
    """How many tokens `a` ending at `ea` and `b` ending at `eb` agree on, counting back (at most
    `hi`); by bisection on slice equality, since agreeing on m implies agreeing on fewer."""
    lo = 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[ea - mid + 1 : ea + 1] == b[eb - mid + 1 : eb + 1]:
            lo = mid
        else:
            hi = mid - 1
    return lo
