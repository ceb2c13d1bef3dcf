"""A request as the engine tracks it: tokens so far and how many of them have KV computed."""

from __future__ import annotations

import enum
import secrets
import time

from slimserve.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Request:
    def __init__(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        eos_ids: frozenset[int],
        priority: int = 0,
    ):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.priority = priority
        self.arrival_time = time.monotonic()
        self.status = RequestStatus.WAITING
        self.all_token_ids = list(prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_preemptions = 0
        self.finish_reason: str | None = None
        self.error: str | None = None  # why the engine failed it (finish_reason "error")
        # In a step that raised with others: run alone until it has drawn a token, so the fault
        # is pinned on the request that causes it (Engine._contain).
        self.suspect = False
        self.stop_ids = frozenset(params.stop_token_ids) | (
            frozenset() if params.ignore_eos else eos_ids
        )
        # The sampler's noise is a function of (seed, position): engine/noise.py.
        self.seed = params.seed if params.seed is not None else secrets.randbits(63)
        # Draft tokens proposed for the next step (speculative decoding): scheduled after the
        # last real token, verified, and only then appended (Engine._postprocess).
        self.spec_token_ids: list[int] = []
        self.proposer_state = None  # the proposer's own (an index over the tokens, say)
        self.draft_record = None  # recent acceptance of its drafts (spec_decode/speculator.py)
        self.draft_evidence = 0  # the kind of match its current drafts came from
        self.drafts_forced = False  # its drafts are what its grammar forces (jump-forward)
        self.logprobs: list[dict[int, float]] | None = [] if params.logprobs is not None else None
        # Per prompt token (the first has none), filled as prompt chunks run.
        self.prompt_logprobs: list[dict[int, float] | None] | None = (
            [None] if params.prompt_logprobs is not None else None
        )
        self.num_cached_tokens: int | None = None  # prompt tokens the prefix cache gave it
        self.num_tier_tokens = 0  # of those, tokens whose KV was loaded from a tier (disk)
        self.queued_s: float | None = None  # arrival to first admission (the scheduler sets it)
        # With a session_id: where its prompt first differs from the session's last request
        # (None: the session held nothing, e.g. its first turn, or its time to live ran out).
        self.session_diverged_at: int | None = None
        # The most tokens it ever had KV for: rows below this after a preemption are recomputed.
        self.computed_high = 0
        self.detokenizer = None  # set by the engine: text so far, stop strings
        self.grammar = None  # set by the engine for a constrained request (structured.py)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[len(self.prompt_token_ids) :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - len(self.prompt_token_ids)

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Prompt positions still owe their logprobs (so their rows need logits)."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < len(
            self.prompt_token_ids
        )

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.all_token_ids.append(token_id)
