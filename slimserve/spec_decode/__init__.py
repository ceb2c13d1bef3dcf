"""Speculative decoding: proposers draft tokens after a request's last one, the engine verifies
them in its next step (engine/rejection.py), and the `Speculator` decides which drafts are worth
verifying. See docs/architecture.md, "Speculative decoding"."""

from __future__ import annotations

from typing import Protocol

from slimserve.config import EngineConfig, SpeculativeConfig
from slimserve.core.request import Request
from slimserve.engine.engine import Engine
from slimserve.spec_decode.index import Match
from slimserve.spec_decode.proposers import NgramProposer, SuffixProposer
from slimserve.spec_decode.speculator import Speculator

__all__ = ["NgramProposer", "SuffixProposer", "Speculator", "attach", "build_engine",
           "build_speculator"]  # fmt: skip


class Proposer(Protocol):
    """Speculative decoding's entry point: draft tokens to verify after a request's last one
    (a list, taken as certain, or a Match with a confidence per token)."""

    def propose(self, req: Request, max_tokens: int) -> list[int] | Match: ...

    def finished(self, req: Request) -> None: ...


def build_engine(config: EngineConfig, progress: bool = False) -> Engine:
    """An engine with the speculative decoding its config asks for, attached once it is built
    (a draft model shares the finished engine's block tables): the front doors' constructor."""
    engine = Engine(config, progress=progress)
    budget = config.scheduler.max_num_batched_tokens
    engine.speculator = build_speculator(config.speculative, budget, engine)
    return engine


def attach(engine: Engine, proposer: Proposer | None) -> None:
    """Drafts from `proposer`, every one verified (no cost model), or none: for tests and tools."""
    budget = engine.config.scheduler.max_num_batched_tokens
    engine.speculator = (
        Speculator(proposer, engine.max_model_len, budget, adaptive=False) if proposer else None
    )


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
