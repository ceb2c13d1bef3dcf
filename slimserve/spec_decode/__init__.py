"""Speculative decoding: proposers draft tokens after a request's last one, the engine verifies
them in its next step (engine/rejection.py), and the `Speculator` decides which drafts are worth
verifying. See docs/architecture.md, "Speculative decoding"."""

from __future__ import annotations

from slimserve.config import SpeculativeConfig
from slimserve.spec_decode.proposers import NgramProposer, SuffixProposer
from slimserve.spec_decode.speculator import Speculator

__all__ = ["NgramProposer", "SuffixProposer", "Speculator", "build_speculator"]


def build_speculator(config: SpeculativeConfig, budget: int, engine=None) -> Speculator | None:
    """The speculator a config asks for (None when speculation is off). `engine` is the target,
    which a draft model shares its block tables with."""
    if config.method is None:
        return None
    if config.method == "ngram":
        proposer = NgramProposer(config.num_tokens)
    elif config.method == "suffix":
        proposer = SuffixProposer(config.num_tokens)
    else:
        from slimserve.spec_decode.draft_model import DraftModelProposer

        proposer = DraftModelProposer(config, engine)
    return Speculator(proposer, config.num_tokens, budget, config.adaptive)
