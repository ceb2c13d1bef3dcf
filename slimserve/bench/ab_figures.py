"""One side of `slimserve bench ab`: run as a script, with the side's tree first on PYTHONPATH.

It uses only the public `LLM` API that every version since the first has (token-id prompts,
`SamplingParams`, `use_tqdm`), so the same figures can be taken of an old commit. Prints one JSON
line: prefill tok/s of one prompt, and greedy decode tok/s at each batch size (the time of a
1-token run subtracted, so prefill does not count), each the best of `--runs`.
"""

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--decode-prompt-len", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    import slimserve
    from slimserve import LLM, SamplingParams

    llm = LLM(kv_cache_memory="512MiB", enable_prefix_caching=False, num_threads=args.threads)
    g = torch.Generator().manual_seed(0)

    def prompt(n: int) -> list[int]:
        return torch.randint(1000, 40000, (n,), generator=g).tolist()

    def timed(prompts, max_tokens: int) -> float:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        t = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - t

    out = {"slimserve": slimserve.__file__}
    long = prompt(args.prompt_len)
    timed([long], 1)  # warm up
    out[f"prefill_{args.prompt_len}_tok_s"] = max(
        args.prompt_len / timed([long], 1) for _ in range(args.runs)
    )
    for b in args.batch:
        prompts = [prompt(args.decode_prompt_len) for _ in range(b)]
        best = 0.0
        for _ in range(args.runs):
            full = timed(prompts, args.decode_tokens)
            first = timed(prompts, 1)
            best = max(best, b * (args.decode_tokens - 1) / max(full - first, 1e-9))
        out[f"decode_b{b}_tok_s"] = best
    print(json.dumps(out))


if __name__ == "__main__":
    main()
