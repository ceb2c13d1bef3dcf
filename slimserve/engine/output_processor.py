"""What a step's accepted tokens do to a request: appended one by one (logprobs, grammar,
detokenizer) until one ends it, and the RequestOutput a caller sees."""

from __future__ import annotations

from slimserve.core.request import Request
from slimserve.errors import RequestFailed
from slimserve.outputs import CompletionOutput, RequestOutput


def append_tokens(req: Request, tokens: list[int], logprobs, max_model_len: int) -> str | None:
    """Append tokens until one ends the request; returns the finish reason, or None."""
    for tok, lp in zip(tokens, logprobs):
        req.append_token(tok)
        if req.logprobs is not None:
            req.logprobs.append(lp)
        if req.grammar is not None:
            req.grammar.accept(tok)
            if req.grammar.failed:
                raise RequestFailed(f"the output left its constraint: {req.grammar.failed}")
            if req.grammar.done:  # complete: nothing but the end may follow
                req.detokenizer.add(tok)
                return "stop"
        if tok in req.stop_ids or req.detokenizer.add(tok):
            return "stop"
        if req.num_output_tokens >= req.params.max_tokens or req.num_tokens >= max_model_len:
            return "length"
    return None


def to_output(req: Request) -> RequestOutput:
    done = req.finished
    completion = CompletionOutput(
        index=0,
        text=req.detokenizer.visible_text(done),
        token_ids=req.output_token_ids,
        finish_reason=req.finish_reason,
        logprobs=req.logprobs,
    )
    return RequestOutput(
        req.request_id, req.prompt, req.prompt_token_ids, [completion], done, req.error,
        req.prompt_logprobs, req.num_cached_tokens or 0, req.num_tier_tokens,
        req.session_diverged_at, req.queued_s,
    )  # fmt: skip
