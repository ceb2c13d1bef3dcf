"""`slimserve generate | chat | bench`: one line and exit code 2 on any error we anticipate."""

from __future__ import annotations

import argparse
import logging
import sys

from slimserve.config import (
    KERNEL_CHOICES,
    KV_CACHE_DTYPES,
    QUANTIZATIONS,
    SCHEDULING_POLICIES,
    SPECULATIVE_METHODS,
    default_of,
)
from slimserve.errors import SlimserveError

# Engine flags default to None: an unset flag takes its config dataclass's default.
ENGINE_FLAGS = {  # CLI dest -> flat engine setting (slimserve/config.py, FLAT_FIELDS)
    "kv_cache_memory": "kv_cache_memory",
    "kv_cache_dtype": "kv_cache_dtype",
    "kv_disk_cache": "kv_disk_cache",
    "kv_disk_cache_size": "kv_disk_cache_size",
    "session_ttl": "session_ttl",
    "max_sessions": "max_sessions",
    "block_size": "block_size",
    "max_num_seqs": "max_num_seqs",
    "max_num_batched_tokens": "max_num_batched_tokens",
    "max_model_len": "max_model_len",
    "scheduling_policy": "scheduling_policy",
    "tpot_slo_ms": "tpot_slo_ms",
    "enable_prefix_caching": "enable_prefix_caching",
    "threads": "num_threads",
    "quantization": "quantization",
    "quant_group_size": "quant_group_size",
    "kernels": "kernels",
    "speculative": "speculative",
    "num_speculative_tokens": "num_speculative_tokens",
    "speculative_model": "speculative_model",
    "speculative_adaptive": "speculative_adaptive",
    "expert_cache_memory": "expert_cache_memory",
    "expert_prefetch": "expert_prefetch",
    "memory_budget": "memory_budget",
}


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    d = default_of
    g.add_argument(
        "--model",
        default=None,
        help="a .gguf file or an HF directory (default: SmolLM2-135M-Instruct)",
    )
    g.add_argument("--kv-cache-memory", help="KV cache budget, e.g. 512MiB or 2GiB (default 1GiB)")
    g.add_argument(
        "--kv-cache-dtype",
        choices=list(KV_CACHE_DTYPES),
        help=f"{d('kv_cache_dtype')} (default): 2x the tokens of float32 in the same "
        "--kv-cache-memory; int8: per-token scales, ~3.8x",
    )
    g.add_argument(
        "--kv-disk-cache",
        metavar="DIR",
        help="keep computed KV blocks on disk here too: prefixes evicted from RAM, or from before "
        "a restart, are read back instead of recomputed (default off)",
    )
    g.add_argument(
        "--kv-disk-cache-size",
        metavar="SIZE",
        help="bound of --kv-disk-cache, e.g. 20GiB (default 8GiB); least recently used out first",
    )
    g.add_argument(
        "--session-ttl",
        type=float,
        metavar="SECONDS",
        help="a finished request with a session_id keeps its KV this long for the session's next "
        "turn (an agent's tool call between turns); released first under memory pressure "
        "(default 0: off)",
    )
    g.add_argument(
        "--max-sessions",
        type=int,
        help=f"sessions kept at once; a new one past it is refused (default {d('max_sessions')})",
    )
    g.add_argument(
        "--memory-budget",
        metavar="SIZE",
        help="one RAM budget, e.g. 4GiB, over the weights, the expert cache, the KV cache and the "
        "disk cache's buffers: the KV cache gets what the rest leaves (at most "
        "--kv-cache-memory); /props and /metrics report each part",
    )
    g.add_argument("--block-size", type=int, help=f"default {d('block_size')}")
    g.add_argument("--max-num-seqs", type=int, help=f"default {d('max_num_seqs')}")
    g.add_argument(
        "--max-num-batched-tokens",
        type=int,
        help=f"per-step token budget (default {d('max_num_batched_tokens')})",
    )
    g.add_argument("--max-model-len", type=int, help="default: the model's context length")
    g.add_argument(
        "--scheduling-policy",
        choices=list(SCHEDULING_POLICIES),
        help="priority (default): requests' priority (lower first) orders them and a better one "
        "displaces worse running ones; with equal priorities, arrival order. fcfs: arrival only",
    )
    g.add_argument(
        "--tpot-slo-ms",
        type=float,
        metavar="MS",
        help="time-per-output-token target: while requests decode, prompt chunks are cut so a "
        "step stays within it (by a step-time model fitted as it runs); long prompts still "
        "progress every step (default: off, the whole token budget)",
    )
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction)
    g.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    g.add_argument(
        "--quantization",
        choices=[q for q in QUANTIZATIONS if q],
        help="auto (default): a GGUF runs from its own 4/8-bit blocks, anything else in float32; "
        "none: float32; int4/int8: quantize a float checkpoint's linears at load",
    )
    g.add_argument(
        "--quant-group-size",
        type=int,
        help=f"int4: inputs per scale, 32, 64 or 128 (default {d('quant_group_size')})",
    )
    g.add_argument(
        "--kernels",
        choices=list(KERNEL_CHOICES),
        help="auto (default): native CPU kernels where they run; none: PyTorch ops only",
    )
    g.add_argument(
        "--speculative",
        choices=[m for m in SPECULATIVE_METHODS if m],
        help="speculative decoding (default off): ngram (prompt lookup), suffix (matches in the "
        "request and earlier outputs), draft (a smaller model, --speculative-model)",
    )
    g.add_argument(
        "--num-speculative-tokens",
        type=int,
        help=f"at most this many drafts a request a step (default {d('num_speculative_tokens')})",
    )
    g.add_argument("--speculative-model", help="the draft model (.gguf or HF directory)")
    g.add_argument(
        "--speculative-adaptive",
        action=argparse.BooleanOptionalAction,
        help="verify only drafts the step-cost model says pay (default on)",
    )
    g.add_argument(
        "--expert-cache-memory",
        help="MoE models: keep the experts on disk and cache the hot ones in this much RAM, "
        "e.g. 512MiB (default: every expert resident)",
    )
    g.add_argument(
        "--expert-prefetch",
        action=argparse.BooleanOptionalAction,
        help="with --expert-cache-memory: read the next layer's likely experts ahead (default off)",
    )


def engine_settings(args) -> dict:
    """The engine flags the user set, as flat engine settings."""
    return {
        flat: getattr(args, dest)
        for dest, flat in ENGINE_FLAGS.items()
        if getattr(args, dest, None) is not None
    }


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int = 256) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--top-k", type=int, default=40, help="0 disables")
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--system", default=None, help="system prompt")
    c = p.add_argument_group("constraints (one at most)").add_mutually_exclusive_group()
    c.add_argument("--json-schema", metavar="FILE", help="output JSON valid under this schema")
    c.add_argument("--json", action="store_true", help="output a JSON object")
    c.add_argument("--regex", help="output matching this regular expression")
    c.add_argument("--choice", action="append", help="output exactly one of these (repeatable)")
    c.add_argument("--grammar", metavar="FILE", help="output of this Lark grammar (llguidance's)")


def make_llm(args, progress: bool = True):
    from slimserve.llm import LLM

    llm = LLM(args.model, progress=progress and sys.stderr.isatty(), **engine_settings(args))
    from slimserve.engine.memory import load_summary

    print(f"[slimserve] {load_summary(llm.engine)}", file=sys.stderr)
    return llm


def sampling_params(args):
    from slimserve.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=tuple(args.stop),
        structured=_constraint(args),
    )


def _constraint(args):
    """The constraint flags as a StructuredOutputs (None without one)."""
    from slimserve.errors import InvalidRequest
    from slimserve.structured import StructuredOutputs

    def read(path: str, flag: str) -> str:
        try:
            with open(path, encoding="utf-8") as f:
                return f.read()
        except OSError as e:
            raise InvalidRequest(f"cannot read {flag} {path}: {e.strerror}", param=flag) from e

    if getattr(args, "json_schema", None):
        return StructuredOutputs(json=read(args.json_schema, "--json-schema"),
                                 param="--json-schema")  # fmt: skip
    if getattr(args, "json", False):
        return StructuredOutputs(json_object=True, param="--json")
    if getattr(args, "regex", None):
        return StructuredOutputs(regex=args.regex, param="--regex")
    if getattr(args, "choice", None):
        return StructuredOutputs(choice=args.choice, param="--choice")
    if getattr(args, "grammar", None):
        return StructuredOutputs(grammar=read(args.grammar, "--grammar"), param="--grammar")
    return None


def stream_to_stdout(llm, prompt, params) -> str:
    shown = ""
    for out in llm.stream(prompt, params):
        text = out.outputs[0].text
        sys.stdout.write(text[len(shown) :])
        sys.stdout.flush()
        shown = text
    sys.stdout.write("\n")
    return shown


def cmd_generate(args) -> int:
    params = sampling_params(args)  # validate before the model loads
    llm = make_llm(args)
    if args.raw or not llm.tokenizer.chat_template:  # a base model (no template): as is
        if not args.raw:
            print(
                "[slimserve] the model has no chat template: the prompt goes as is", file=sys.stderr
            )
        prompt = args.prompt
    else:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        messages.append({"role": "user", "content": args.prompt})
        prompt = llm.tokenizer.apply_chat_template(messages)
    stream_to_stdout(llm, prompt, params)
    return 0


def cmd_chat(args) -> int:
    params = sampling_params(args)
    llm = make_llm(args)
    history = [{"role": "system", "content": args.system}] if args.system else []
    print("Chat with the model. Ctrl-D or /exit to quit, /reset to clear history.", file=sys.stderr)
    while True:
        try:
            line = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            del history[1 if args.system else 0 :]
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        try:
            reply = stream_to_stdout(llm, llm.tokenizer.apply_chat_template(history), params)
        except KeyboardInterrupt:
            print("\n[interrupted]", file=sys.stderr)
            history.pop()
            continue
        history.append({"role": "assistant", "content": reply})


def cmd_serve(args) -> int:
    import os

    if args.replicas is not None:
        try:
            from slimserve.distributed.serve import serve_forever
        except ImportError as e:
            print(f"error: --replicas needs Ray Serve: pip install 'slimserve[ray]' ({e})",
                  file=sys.stderr)  # fmt: skip
            return 2
        return serve_forever(args, engine_settings(args))

    import torch

    from slimserve.engine.async_engine import AsyncEngine
    from slimserve.server.api import create_app
    from slimserve.server.run import run

    # Built before the server starts, so a bad model or flag fails here with one line and exit
    # code 2 (server.api.build_app builds it in the app's lifespan instead, for other hosts).
    async_engine = AsyncEngine(lambda: make_llm(args).engine, max_queue=args.max_queue)
    engine = async_engine.engine
    name = args.served_model_name or os.path.splitext(engine.model_name)[0]
    print(
        f"[slimserve] serving {name} at http://{args.host}:{args.port}/v1 "
        f"(KV cache {engine.capacity_tokens} tokens, {torch.get_num_threads()} threads); "
        f"chat page at http://{args.host}:{args.port}/",
        file=sys.stderr,
        flush=True,
    )
    try:
        app = create_app(async_engine, name, args.api_key)
        return run(app, args.host, args.port, args.drain_timeout)
    finally:
        async_engine.shutdown()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slimserve", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text for one prompt (streamed)")
    gen.add_argument("prompt")
    gen.add_argument("--raw", action="store_true", help="send the prompt as is, no chat template")
    add_sampling_args(gen)
    add_engine_args(gen)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive chat with history")
    add_sampling_args(chat, max_tokens=512)
    add_engine_args(chat)
    chat.set_defaults(func=cmd_chat)

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    serve.add_argument("--served-model-name", default=None, help="default: the model file's name")
    serve.add_argument(
        "--max-queue",
        type=int,
        default=256,
        help="waiting requests beyond this get 503 with Retry-After",
    )
    serve.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="seconds in-flight requests get to finish on SIGTERM/SIGINT (default 30)",
    )
    g = serve.add_argument_group("scale-out on Ray Serve (pip install 'slimserve[ray]')")
    g.add_argument(
        "--replicas",
        type=int,
        default=None,
        help="run N engine replicas on Ray Serve behind one router (on one machine they split "
        "its cores)",
    )
    g.add_argument(
        "--routing",
        choices=["prefix", "least-loaded", "round-robin"],
        default="prefix",
        help="prefix (default): where the prompt finishes soonest, counting the prefix a "
        "replica is thought to hold against the work queued there",
    )
    g.add_argument(
        "--ray-address",
        default=None,
        help="join this Ray cluster (`ray start --head` prints it); default: start one here",
    )
    add_engine_args(serve)
    serve.set_defaults(func=cmd_serve)

    from slimserve.cli_tools import add_tool_parsers

    add_tool_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="[%(name)s] %(message)s"
    )
    try:
        return args.func(args)
    except SlimserveError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
