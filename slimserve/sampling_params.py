"""Per-request sampling parameters, shaped like vLLM's so users can switch."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from slimserve.errors import InvalidRequest

if TYPE_CHECKING:
    from slimserve.structured import StructuredOutputs

_SESSION_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick tokens and when to stop.

    temperature 0 means greedy. `top_k` 0 or -1 disables top-k; `top_p` 1.0 disables top-p.
    `stop` strings end generation and are not included in the output text.
    `logprobs` asks for the log-probability of each sampled token plus that many top alternatives.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    # The log-probability of each prompt token given the ones before it, plus that many top
    # alternatives (vLLM's prompt_logprobs; the first token has none). Such a request computes
    # its whole prompt: cached prefix blocks would leave positions without logits.
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    # False: never draft for this request, whatever the engine's speculative setting (its output
    # is the same either way; this only saves the drafting work).
    speculative: bool = True
    # A JSON schema, regex, choice or grammar the output must follow (slimserve/structured.py).
    structured: StructuredOutputs | None = None
    # An agent's conversation: with the engine's session_ttl, the KV of this request's blocks is
    # kept after it finishes, for the session's next turn (kv_cache/manager.py, sessions).
    session_id: str | None = None

    def __post_init__(self):
        # Accept a single string / any iterable for stop fields without making callers wrap them.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids or ()))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        self._validate()

    def _validate(self):
        def bad(param: str, why: str):
            raise InvalidRequest(f"{param} {why}, got {getattr(self, param)!r}", param=param)

        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            bad("max_tokens", "must be an integer >= 1")
        if not 0.0 <= self.temperature <= 100.0:
            bad("temperature", "must be in [0, 100]")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", "must be 0 or -1 (disabled) or a positive integer")
        if not 0.0 <= self.min_p <= 1.0:
            bad("min_p", "must be in [0, 1]")
        if not 0.0 < self.repetition_penalty <= 10.0:
            bad("repetition_penalty", "must be in (0, 10]")
        if not -2.0 <= self.presence_penalty <= 2.0:
            bad("presence_penalty", "must be in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            bad("frequency_penalty", "must be in [-2, 2]")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            bad("logprobs", "must be in [0, 20]")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= 20:
            bad("prompt_logprobs", "must be in [0, 20]")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", "must be non-empty strings")
        if self.seed is not None and not isinstance(self.seed, int):
            bad("seed", "must be an integer")
        if self.session_id is not None and not (
            isinstance(self.session_id, str) and _SESSION_ID.fullmatch(self.session_id)
        ):
            bad("session_id", "must be 1-128 letters, digits or . _ : -")
        if self.structured is not None:
            from slimserve.structured import StructuredOutputs

            if not isinstance(self.structured, StructuredOutputs):
                bad("structured", "must be a slimserve.structured.StructuredOutputs")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )
