"""The engine loop: add requests, step, stream outputs. The CLI, LLM and server drive this."""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass

import torch

from slimserve.config import EngineConfig, num_threads_from_env
from slimserve.engine.detokenizer import Detokenizer
from slimserve.engine.model_runner import ModelRunner
from slimserve.engine.request import Request
from slimserve.engine.scheduler import Scheduler
from slimserve.errors import CapacityError, ContextLengthExceeded, InvalidRequest
from slimserve.loader import open_model
from slimserve.models import get_model_class
from slimserve.outputs import CompletionOutput, RequestOutput
from slimserve.sampling_params import SamplingParams

logger = logging.getLogger("slimserve")


@dataclass(frozen=True, slots=True)
class EngineStats:
    """A snapshot for /metrics and the benchmarks; token counts are cumulative."""

    running: int
    waiting: int
    kv_blocks_total: int
    kv_blocks_free: int
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of those, served from cache
    preemptions: int
    steps: int
    last_batch_size: int
    last_batch_tokens: int
    tokens_computed: int  # every token the model ran (prompt chunks and decodes)
    prompt_tokens_computed: int  # of those, prompt tokens (the rest came from the prefix cache)


def load_model(
    source, quantization: str | None = None, group_size: int = 32, progress: bool = False
) -> torch.nn.Module:
    """Build the model and load its weights; with a quantization method, its layers are swapped
    for collectors first and packed after (slimserve/quant), so no float copy is kept."""
    from slimserve import quant

    cfg = source.config
    model = get_model_class(cfg.architecture)(cfg)
    method = quant.resolve_method(quantization, source, group_size)
    if method:
        quant.prepare(model, method, group_size)
    weights = source.weights(quant.keep_types(method))
    if progress:
        from tqdm import tqdm

        weights = tqdm(weights, desc=f"Loading {source.name}", unit="tensor", leave=False)
    model.load_weights(weights)
    if method:
        quant.finalize(model)
    model.quantization = method or "none"
    return model.eval()


class Engine:
    def __init__(self, config: EngineConfig | None = None, progress: bool = False):
        config = config or EngineConfig()
        threads = config.num_threads or num_threads_from_env()
        if threads:
            torch.set_num_threads(threads)
        t0 = time.perf_counter()
        self.config = config
        self.source = open_model(config.model)
        self.model_config = self.source.config
        self.tokenizer = self.source.tokenizer()
        self.model = load_model(self.source, config.quantization, config.quant_group_size, progress)
        self.runner = ModelRunner(self.model, self.model_config, config.cache)
        self.scheduler = Scheduler(config.scheduler, self.runner.kv)
        self.max_model_len = min(
            config.scheduler.max_model_len or self.model_config.max_position,
            self.model_config.max_position,
        )
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self._steps, self._last_batch = 0, (0, 0)
        self._computed_tokens = self._prompt_tokens_computed = 0
        self.load_seconds = time.perf_counter() - t0
        logger.info(
            "loaded %s in %.1fs; KV cache holds %d tokens",
            self.source.name,
            self.load_seconds,
            self.runner.capacity_tokens,
        )

    @property
    def model_name(self) -> str:
        return self.source.name

    # -- requests ---------------------------------------------------------------------------
    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        priority: int = 0,
    ) -> str:
        """Queue a prompt (text, or token ids) and return its request id."""
        params = params or SamplingParams()
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, list(prompt)
        self._validate(ids, params)
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise InvalidRequest(f"request id {request_id!r} is already in use")
        req = Request(request_id, text, ids, params, self.tokenizer.eos_ids, priority)
        req.detokenizer = Detokenizer(self.tokenizer, params)
        self.requests[request_id] = req
        self.scheduler.add(req)
        return request_id

    def _validate(self, ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise InvalidRequest("the prompt is empty", param="prompt")
        vocab = self.model_config.vocab_size
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
        if self.runner.kv.blocks_needed(total) > self.runner.num_blocks:
            raise CapacityError(
                f"the request needs {total} tokens of KV cache but it holds "
                f"{self.runner.capacity_tokens}; raise --kv-cache-memory"
            )

    def abort(self, request_id: str) -> bool:
        """Stop a request wherever it is (waiting, mid-prefill, decoding) and free its blocks."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        self.scheduler.finish(req, "abort")
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def stats(self) -> EngineStats:
        kv = self.runner.kv
        return EngineStats(
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            kv_blocks_total=kv.num_blocks,
            kv_blocks_free=kv.num_free_blocks,
            prefix_cache_queries=kv.stats.queries,
            prefix_cache_hits=kv.stats.hits,
            preemptions=self.scheduler.num_preemptions,
            steps=self._steps,
            last_batch_size=self._last_batch[0],
            last_batch_tokens=self._last_batch[1],
            tokens_computed=self._computed_tokens,
            prompt_tokens_computed=self._prompt_tokens_computed,
        )

    # -- the step ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one batch; return an output for every request that advanced or finished."""
        out = self.scheduler.schedule()
        self._last_batch = (len(out.scheduled), out.num_tokens)
        if not out.scheduled:
            return []
        self._steps += 1
        self._computed_tokens += out.num_tokens
        self._prompt_tokens_computed += sum(
            max(0, min(n, r.num_prompt_tokens - r.num_computed_tokens)) for r, n in out.scheduled
        )
        sample_reqs, samples = self.runner.execute(out.scheduled)
        self.scheduler.update_after_step(out)
        outputs = []
        for i, req in enumerate(sample_reqs):
            self._append(req, samples.token_ids[i], samples.logprobs[i])
            outputs.append(self._output(req))
            if req.finished:
                del self.requests[req.request_id]
        return outputs

    def _append(self, req: Request, token: int, logprobs) -> None:
        req.append_token(token)
        if req.logprobs is not None:
            req.logprobs.append(logprobs)
        reason = None
        if token in req.stop_ids:
            reason = "stop"
        elif req.detokenizer.add(token):
            reason = "stop"
        elif req.num_output_tokens >= req.params.max_tokens or req.num_tokens >= self.max_model_len:
            reason = "length"
        if reason:
            self.scheduler.finish(req, reason)

    def _output(self, req: Request) -> RequestOutput:
        done = req.finished
        completion = CompletionOutput(
            index=0,
            text=req.detokenizer.visible_text(done),
            token_ids=req.output_token_ids,
            finish_reason=req.finish_reason,
            logprobs=req.logprobs,
        )
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, [completion], done)
