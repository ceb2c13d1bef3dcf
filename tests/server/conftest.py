"""The real server as a subprocess on 127.0.0.1, driven through the official openai client."""

import os
import signal
import subprocess
import sys

import httpx
import pytest

from slimserve.bench.peers import free_port, wait_healthy

API_KEY = "test-key"
MODEL = "smollm2"  # the name the server is started with
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


class ServerProcess:
    def __init__(self, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "slimserve",
                "serve",
                "--port",
                str(self.port),
                "--kv-cache-memory",
                "256MiB",
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            wait_healthy(self.proc, self.url, "slimserve serve")
        except RuntimeError:
            self.proc.kill()
            raise RuntimeError(f"server did not come up:\n{self.proc.communicate()[0]}") from None

    def stop(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return self.proc.returncode, out


@pytest.fixture(scope="session")
def server():
    srv = ServerProcess("--api-key", API_KEY, "--served-model-name", MODEL)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="session")
def aclient(server):
    import openai

    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture
def http(server):
    with httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120
    ) as c:
        yield c


def metric(http, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(http.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise KeyError(name)


@pytest.fixture(scope="session")
def llm(gguf_path):
    """The reference for server outputs: the engine as the server runs it (default quantization,
    the GGUF's own blocks)."""
    from slimserve import LLM

    return LLM(gguf_path, kv_cache_memory="256MiB")
