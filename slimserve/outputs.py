"""What generation returns, shaped like vLLM's RequestOutput so users can switch."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    # "stop" | "length" | "abort" | "error" (see RequestOutput.error) | None while running
    finish_reason: str | None = None
    logprobs: list[dict[int, float]] | None = None  # per token: {sampled id: lp, top ids: lp}


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    error: str | None = None  # why, when the engine failed this request (finish_reason "error")
    # Per prompt token when asked for (SamplingParams.prompt_logprobs); the first is None.
    prompt_logprobs: list[dict[int, float] | None] | None = None
    num_cached_tokens: int = 0  # prompt tokens that came from the prefix cache
    num_disk_cached_tokens: int = 0  # of those, tokens whose KV was read from the disk tier
    # With a session_id: the first prompt position that differs from the session's previous
    # request's prompt and output (None: nothing kept for the session).
    session_diverged_at: int | None = None
    queued_s: float | None = None  # from arrival to its first admission into a step
