"""Model-free proposers: drafts looked up in text the engine has already seen.

`NgramProposer` is prompt lookup (the most recent place where the last few tokens occurred in
the request's own prompt and output; a fixed number of tokens after it). `SuffixProposer` is
SuffixDecoding's scheme: the longest match in the request's own tokens and in a global buffer of
recent outputs of all requests, the continuation most of the matching occurrences agree on, and
a draft whose length follows the match (a long match earns a long draft). Both keep a request's
index on the request, so it goes when the request goes.
"""

from __future__ import annotations

from slimserve.core.request import Request
from slimserve.spec_decode.index import SEPARATOR, Match, TokenIndex


def _own_index(req: Request) -> TokenIndex:
    """The request's index over its tokens, brought up to (not including) its last one."""
    index = req.proposer_state
    if index is None or index.tokens is not req.all_token_ids:
        index = req.proposer_state = TokenIndex(req.all_token_ids)
    index.extend_to(req.num_tokens - 1)
    return index


class NgramProposer:
    """Prompt lookup: the `num_tokens` tokens after the newest earlier occurrence of the
    context's last 2 to `max_ngram` tokens."""

    name = "ngram"

    def __init__(self, num_tokens: int = 8, max_ngram: int = 4):
        self.num_tokens, self.max_ngram = num_tokens, max_ngram

    def propose(self, req: Request, max_tokens: int) -> Match:
        index = _own_index(req)
        return index.lookup(
            req.all_token_ids, min(max_tokens, self.num_tokens), self.max_ngram, newest=True
        )

    def finished(self, req: Request) -> None:
        pass


class SuffixProposer:
    """Drafts from the request's own tokens and from the outputs of earlier requests (the last
    `global_tokens` of them), whichever lookup scores higher. A match of m tokens allows a draft
    of up to `factor` * m tokens (SuffixDecoding's adaptive length), capped by `num_tokens`."""

    name = "suffix"

    def __init__(
        self, num_tokens: int = 16, factor: float = 2.0, max_match: int = 64,
        global_tokens: int = 1 << 17,
    ):  # fmt: skip
        self.num_tokens, self.factor, self.max_match = num_tokens, factor, max_match
        self.global_tokens = global_tokens
        self.outputs = TokenIndex()

    def propose(self, req: Request, max_tokens: int) -> Match:
        ctx, cap = req.all_token_ids, min(max_tokens, self.num_tokens)
        best = Match()
        for index in (_own_index(req), self.outputs):
            found = index.lookup(ctx, cap, self.max_match)
            found.tokens = found.tokens[: max(1, int(self.factor * found.match_len))]
            del found.confidence[len(found.tokens) :]
            if found.score > best.score:
                best = found
        return best

    def finished(self, req: Request) -> None:
        """Add a finished request's output to the global buffer (oldest half dropped when full)."""
        out = req.output_token_ids
        if not out:
            return
        tokens = self.outputs.tokens
        if len(tokens) + len(out) + 1 > self.global_tokens:
            cut = len(tokens) // 2  # drop the oldest half, at a boundary between outputs
            while cut < len(tokens) and tokens[cut] != SEPARATOR:
                cut += 1
            self.outputs = TokenIndex(tokens[cut + 1 :])
            tokens = self.outputs.tokens
        tokens.extend(out[-(self.global_tokens // 2) :])
        tokens.append(SEPARATOR)
        self.outputs.extend_to(len(tokens))
