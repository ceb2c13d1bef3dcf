"""Who drafts what before a step: a request's grammar (the tokens it forces, jump-forward) or the
speculator. Drafts are verified like sampled tokens (rejection.py), so either way the output is
what plain decoding gives."""

from __future__ import annotations

from typing import TYPE_CHECKING

from slimserve.core.request import Request

if TYPE_CHECKING:  # speculative decoding is a plug-in above the engine (spec_decode/)
    from slimserve.spec_decode import Speculator


def propose_drafts(
    running: list[Request], speculator: Speculator | None, jump_forward: bool,
    max_model_len: int, vocab_size: int,
) -> None:  # fmt: skip
    """Drafts for each running request about to decode (its KV all computed but for its last
    token), with room for at least one draft and the token after it: the tokens its grammar
    forces (with `jump_forward`), else the speculator's."""
    ready = []
    for req in running:
        room = min(req.params.max_tokens - req.num_output_tokens, max_model_len - req.num_tokens)
        if req.num_computed_tokens == req.num_tokens - 1 and room > 1:
            ready.append((req, room))
    speculate = []
    for req, room in ready:
        forced = req.grammar.forced(room - 1) if jump_forward and req.grammar else []
        if forced:
            req.spec_token_ids, req.drafts_forced = forced, True
        elif req.params.speculative and speculator is not None:
            speculate.append((req, room))
    if speculate:
        speculator.plan(speculate)
    for req, _ in ready:
        # A draft the kernels cannot index ends the drafts: never a bad read mid-step.
        drafts = req.spec_token_ids
        valid = next(
            (i for i, t in enumerate(drafts) if not (isinstance(t, int) and 0 <= t < vocab_size)),
            len(drafts),
        )
        del drafts[valid:]
