"""One side of `slimserve bench ab`: run as a script, with the side's tree first on PYTHONPATH.

It loads the default model once, prints `ready`, then answers one figure per line it reads on
stdin (`prefill`, `decode B`) with one JSON number: prefill tok/s of one prompt, or greedy decode
tok/s of B sequences (the time of a 1-token run subtracted, so prefill does not count). The
driver alternates the two sides figure by figure, so both see the same machine.

It uses only the public `LLM` API that every version since the first has (token-id prompts,
`SamplingParams`, `use_tqdm`), so the same figures can be taken of an old commit.
"""

import argparse
import json
import sys
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--decode-prompt-len", type=int, default=64)
    args = ap.parse_args()

    import slimserve
    from slimserve import LLM, SamplingParams

    llm = LLM(kv_cache_memory="512MiB", enable_prefix_caching=False)
    g = torch.Generator().manual_seed(0)

    def prompt(n: int) -> list[int]:
        return torch.randint(1000, 40000, (n,), generator=g).tolist()

    def timed(prompts, max_tokens: int) -> float:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        t = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - t

    long = prompt(args.prompt_len)
    batches: dict[int, list[list[int]]] = {}
    timed([long], 1)  # warm up
    print(json.dumps({"ready": slimserve.__file__}), flush=True)
    for line in sys.stdin:
        what = line.split()
        if not what:
            continue
        if what[0] == "prefill":
            value = args.prompt_len / timed([long], 1)
        else:
            b = int(what[1])
            prompts = batches.setdefault(b, [prompt(args.decode_prompt_len) for _ in range(b)])
            full = timed(prompts, args.decode_tokens)
            first = timed(prompts, 1)
            value = b * (args.decode_tokens - 1) / max(full - first, 1e-9)
        print(json.dumps(value), flush=True)


if __name__ == "__main__":
    main()
