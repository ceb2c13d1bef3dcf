"""A prompt into a Request: tokenized, checked against the model and the KV cache, with its
detokenizer and grammar attached. It reads only what is fixed once the engine is built, so any
thread may take a request in while a step runs (async_engine.py)."""

from __future__ import annotations

import threading

from slimserve.core.request import Request
from slimserve.engine.detokenizer import Detokenizer
from slimserve.errors import CapacityError, ContextLengthExceeded, InvalidRequest
from slimserve.kv_cache.spec import KVCacheSpec
from slimserve.sampling_params import SamplingParams
from slimserve.structured import GrammarCompiler


class Intake:
    def __init__(
        self, tokenizer, vocab_size: int, max_model_len: int, kv_spec: KVCacheSpec, chunk: int
    ):
        """`chunk`: the scheduler's token budget, the largest prefill chunk a request holds
        pages for at once."""
        self.tokenizer, self.vocab_size, self.max_model_len = tokenizer, vocab_size, max_model_len
        self.kv_spec, self.chunk = kv_spec, chunk
        self._compiler: GrammarCompiler | None = None
        self._lock = threading.Lock()

    def make(
        self, prompt: str | list[int], params: SamplingParams | None, request_id: str,
        priority: int = 0,
    ) -> Request:  # fmt: skip
        params = params or SamplingParams()
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, list(prompt)
        self.validate(ids, params)
        req = Request(request_id, text, ids, params, self.tokenizer.eos_ids, priority)
        req.detokenizer = Detokenizer(self.tokenizer, params)
        if params.structured is not None:
            req.grammar = self.grammars().compile(params.structured)
        return req

    def grammars(self) -> GrammarCompiler:
        """Built on the first constrained request (about a second), once, whichever thread asks."""
        with self._lock:
            if self._compiler is None:
                self._compiler = GrammarCompiler(self.tokenizer, self.vocab_size)
            return self._compiler

    def validate(self, ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise InvalidRequest("the prompt is empty", param="prompt")
        vocab = self.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in ids):
            raise InvalidRequest(
                f"prompt token ids must be integers in [0, {vocab})", param="prompt"
            )
        total = len(ids) + params.max_tokens
        if total > self.max_model_len:
            raise ContextLengthExceeded(
                f"the prompt has {len(ids)} tokens and max_tokens is {params.max_tokens}: "
                f"{total} tokens exceed the model's context length of {self.max_model_len}",
                param="max_tokens",
            )
        if self.kv_spec.pages_held(total, self.chunk) > self.kv_spec.num_blocks:
            raise CapacityError(
                f"the request needs {total} tokens of KV cache but it holds "
                f"{self.kv_spec.capacity_tokens}; raise --kv-cache-memory"
            )
