"""The Python front door, shaped like vLLM's `LLM` so users can switch."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence

from slimserve.config import engine_config
from slimserve.errors import InvalidRequest
from slimserve.outputs import RequestOutput
from slimserve.sampling_params import SamplingParams
from slimserve.spec_decode import build_engine

Prompt = str | list[int]


class LLM:
    """Load a model once, then generate.

    >>> llm = LLM()  # the default model
    >>> llm.generate(["Hello"], SamplingParams(max_tokens=8))[0].outputs[0].text

    Engine settings are keywords, each defaulting to its config dataclass's value
    (slimserve/config.py, FLAT_FIELDS): kv_cache_memory ("1GiB"), block_size,
    enable_prefix_caching, kv_cache_dtype, max_num_seqs, max_num_batched_tokens, max_model_len,
    num_threads, quantization, quant_group_size, kernels ("auto" or "none").
    """

    def __init__(self, model: str | None = None, *, progress: bool = False, **engine_settings):
        self.engine = build_engine(engine_config(model, **engine_settings), progress=progress)
        self.tokenizer = self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool | None = None,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion (batched together); outputs in prompt order.

        `use_tqdm` None shows a progress bar (requests done, tok/s) for several prompts on a
        terminal. `priority`: one integer per prompt, lower is served first (default 0)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise InvalidRequest("one SamplingParams per prompt, or one for all")
        priority = list(priority) if priority is not None else [0] * len(prompts)
        if len(priority) != len(prompts):
            raise InvalidRequest("one priority per prompt", param="priority")
        if use_tqdm is None:
            use_tqdm = len(prompts) > 1 and sys.stderr.isatty()
        ids = []
        try:
            for p, sp, prio in zip(prompts, params, priority):
                ids.append(self.engine.add_request(p, sp, priority=prio))
        except Exception:
            for rid in ids:
                self.engine.abort(rid)
            raise
        return self._run(ids, use_tqdm)

    def chat(
        self,
        messages: list[dict] | Sequence[list[dict]],
        sampling_params: SamplingParams | None = None,
        use_tqdm: bool | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation (or a list), then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [
            self.tokenizer.apply_chat_template(c, add_generation_prompt) for c in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm)

    def stream(
        self, prompt: Prompt, sampling_params: SamplingParams | None = None
    ) -> Iterator[RequestOutput]:
        """Yield the request's output after every step that advanced it (text is cumulative)."""
        rid = self.engine.add_request(prompt, sampling_params)
        try:
            while True:
                for out in self.engine.step():
                    if out.request_id == rid:
                        yield out
                        if out.finished:
                            return
        finally:
            self.engine.abort(
                rid
            )  # a no-op once finished; frees blocks if the caller stopped early

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        pending = set(ids)
        results: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(ids), desc="Generating", unit="req")
        generated = 0
        try:
            while pending:
                for out in self.engine.step():
                    generated += 1
                    if out.finished and out.request_id in pending:
                        results[out.request_id] = out
                        pending.discard(out.request_id)
                        if bar:
                            bar.update(1)
                if bar:
                    bar.set_postfix(
                        tok_s=f"{generated / max(bar.format_dict['elapsed'], 1e-9):.1f}"
                    )
        finally:
            if bar:
                bar.close()
            for rid in pending:
                self.engine.abort(rid)
        return [results[i] for i in ids]
