"""Shaping engine outputs into OpenAI responses: one HTTP request's choices, streamed as SSE
chunks or collected into one JSON body. Submission happens before any byte is sent."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import TYPE_CHECKING

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from slimserve.errors import EngineDead, RequestFailed, SlimserveError
from slimserve.server.tools import StreamParser

if TYPE_CHECKING:
    from slimserve.server.api import Server


async def respond(
    srv: Server, request: Request, body, prompts, params, chat: bool, tools=None, echo=None
):
    """Submit every choice's request, then stream or collect. Submission errors (bad prompt,
    too long, queue full) raise before any byte of the response is sent. `echo`: per choice, the
    prompt text that a completion with echo starts with."""
    base = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    queue: asyncio.Queue = asyncio.Queue()
    streams = []
    try:
        for i, (p, sp) in enumerate(zip(prompts, params)):
            streams.append(
                await srv.engine.submit(p, sp, f"{base}-{i}", queue, body.priority)
            )
    except BaseException:
        for s in streams:
            s.close()
        raise
    job = _Job(srv, base, body, prompts, streams, queue, chat, tools, echo)
    if body.stream:
        return StreamingResponse(job.sse(), media_type="text/event-stream")
    task = asyncio.ensure_future(job.collect())
    while not task.done():
        await asyncio.wait({task}, timeout=0.2)
        if not task.done() and await request.is_disconnected():
            task.cancel()  # its finally aborts every choice
            return Response(status_code=499)
    return JSONResponse(task.result())


class _Job:
    """One HTTP request's choices, merged from one queue, shaped as OpenAI responses."""

    def __init__(self, srv, base, body, prompts, streams, queue, chat, tools=None, echo=None):
        self.srv, self.id, self.body, self.chat = srv, base, body, chat
        self.tools = tools  # a ToolPlan (server/tools.py) when the request has tools
        self.echo = echo  # per choice, the prompt text a completion starts with
        # max_tokens 0 with echo: the one token drawn is not shown (nor counted).
        self.hide = not chat and body.max_tokens == 0
        self.prompts, self.streams, self.queue = prompts, streams, queue
        self.index = {s.request_id: i for i, s in enumerate(streams)}
        self.created = int(time.time())
        self.start = time.monotonic()
        self.first: dict[int, float] = {}
        self.sent_text = [""] * len(streams)
        self.sent_tokens = [0] * len(streams)
        self.sent_chars = [0] * len(streams)  # of text, echoed prompt included
        self.echo_sent = [False] * len(streams)
        self.finals: dict[int, object] = {}

    async def outputs(self):
        """(choice index, RequestOutput) as the engine produces them; aborts leftovers on exit."""
        try:
            while len(self.finals) < len(self.streams):
                item = await self.queue.get()
                if isinstance(item, SlimserveError):  # a drain past its deadline
                    raise item
                if isinstance(item, BaseException):
                    raise EngineDead(f"the engine stopped: {item}")
                i = self.index[item.request_id]
                if item.error is not None:
                    self.finals[i] = item
                    self.streams[i].finished = True
                    self.srv.metrics.requests.labels("error").inc()
                    raise RequestFailed(item.error)
                if item.outputs[0].token_ids and i not in self.first:
                    self.first[i] = time.monotonic()
                if item.finished:
                    self.finals[i] = item
                    self.streams[i].finished = True
                    self._observe(i, item)
                yield i, item
        finally:
            for i, s in enumerate(self.streams):
                if i not in self.finals:
                    s.close()
                    self.srv.metrics.requests.labels("abort").inc()

    def _observe(self, i, out):
        c = out.outputs[0]
        self.srv.metrics.observe(
            c.finish_reason or "abort",
            len(out.prompt_token_ids),
            len(c.token_ids),
            self.start,
            self.first.get(i),
            time.monotonic(),
            self.body.priority,
            out.queued_s,
        )

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.prompts[:: self.body.n])
        completion = sum(len(self._shown(o)[1]) for o in self.finals.values())
        # Per prompt, its first choice's hit (the others share the blocks it computes).
        firsts = [o for i, o in self.finals.items() if i % self.body.n == 0]
        cached = sum(o.num_cached_tokens for o in firsts)
        disk = sum(o.num_disk_cached_tokens for o in firsts)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            # Where the cached tokens came from: the RAM pool or the disk tier (kv_cache/tiers.py).
            "prompt_tokens_details": {
                "cached_tokens": cached,
                "cached_tokens_by_tier": {"ram": cached - disk, "disk": disk},
                **self._session_details(firsts),
            },
        }

    def _session_details(self, firsts) -> dict:
        """With a session_id: where the prompt first differed from the session's last request
        (null when nothing was kept for it), so an agent can see why a turn missed."""
        if self.body.session_id is None or not firsts:
            return {}
        return {"session_diverged_at": firsts[0].session_diverged_at}

    def _shown(self, out) -> tuple[str, list[int]]:
        """The completion's text and tokens as the response shows them."""
        c = out.outputs[0]
        return ("", []) if self.hide else (c.text, c.token_ids)

    def _logprobs(self, completion, start: int, end: int, offset: int = 0):
        """Logprobs of output tokens start:end; `offset`: where the first one's text starts in
        the choice's text (completions report it)."""
        if completion.logprobs is None:
            return None
        toks = completion.token_ids[start:end]
        entries = completion.logprobs[start:end]
        if not self.chat:
            return self._completion_logprobs(toks, entries, offset)
        text = self.srv.token_text
        ranked = [_ranked(e, self.body.top_logprobs) for e in entries]
        return {
            "content": [
                {
                    "token": text(t),
                    "logprob": e[t],
                    "bytes": list(text(t).encode()),
                    "top_logprobs": [
                        {"token": text(a), "logprob": lp, "bytes": list(text(a).encode())}
                        for a, lp in r
                    ],
                }
                for t, e, r in zip(toks, entries, ranked)
            ]
        }

    def _completion_logprobs(self, toks, entries, offset: int) -> dict:
        """OpenAI's completions logprobs; an entry of None (the prompt's first token, which
        nothing scores) gives nulls."""
        text = self.srv.token_text
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t, e in zip(toks, entries):
            s = text(t)
            out["tokens"].append(s)
            out["text_offset"].append(offset)
            offset += len(s)
            out["token_logprobs"].append(None if e is None else e[t])
            top = None if e is None else _ranked(e, self.body.logprobs)
            out["top_logprobs"].append(None if top is None else {text(a): lp for a, lp in top})
        return out

    def _echoed(self, i: int, out, text: str, lp):
        """A completion's text and logprobs with its prompt (and the prompt's logprobs) first."""
        prompt = self.echo[i]
        if lp is None:
            return prompt + text, None
        head = self._completion_logprobs(out.prompt_token_ids, out.prompt_logprobs, 0)
        return prompt + text, {k: head[k] + lp[k] for k in head}

    async def collect(self) -> dict:
        async for _ in self.outputs():
            pass
        choices = []
        for i in range(len(self.streams)):
            out = self.finals[i]
            c = out.outputs[0]
            text, toks = self._shown(out)
            lp = self._logprobs(c, 0, len(toks), len(self.echo[i]) if self.echo else 0)
            if self.echo:
                text, lp = self._echoed(i, out, text, lp)
            if self.chat:
                message = {"role": "assistant", "content": c.text}
                reason = c.finish_reason
                if self.tools is not None:
                    content, calls = self.tools.parse(c.text)
                    if calls:
                        message = {"role": "assistant", "content": content, "tool_calls": calls}
                        reason = "tool_calls" if reason == "stop" else reason
                choices.append(
                    {"index": i, "message": message, "logprobs": lp, "finish_reason": reason}
                )
            else:
                choices.append(
                    {"index": i, "text": text, "logprobs": lp, "finish_reason": c.finish_reason}
                )
        return {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.srv.served_name,
            "choices": choices,
            "usage": self.usage(),
        }

    def _chunk(self, choices: list, usage: dict | None = None) -> str:
        body = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.srv.served_name,
            "choices": choices,
        }
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    async def sse(self):
        if self.chat:
            yield self._chunk(
                [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                    for i in range(len(self.streams))
                ]
            )
        parsers = [StreamParser(self.tools) if self.tools else None for _ in self.streams]
        try:
            async for i, out in self.outputs():
                c = out.outputs[0]
                text, toks = self._shown(out)
                delta = text[len(self.sent_text[i]) :]
                first = self.echo is not None and not self.echo_sent[i]
                offset = len(self.echo[i]) if first else self.sent_chars[i]
                lp = self._logprobs(c, self.sent_tokens[i], len(toks), offset)
                if first:  # the prompt comes first, in the choice's first chunk
                    delta, lp = self._echoed(i, out, delta, lp)
                    self.echo_sent[i] = True
                self.sent_text[i], self.sent_tokens[i] = text, len(toks)
                self.sent_chars[i] += len(delta)
                calls, reason = [], c.finish_reason
                if parsers[i] is not None:
                    delta, calls = parsers[i].feed(delta, final=out.finished)
                    if reason == "stop" and parsers[i].calls:
                        reason = "tool_calls"
                if not delta and not calls and not out.finished and lp is None:
                    continue
                if self.chat:
                    d = {"content": delta} if delta else {}
                    if calls:
                        d["tool_calls"] = calls
                    choice = {"index": i, "delta": d, "logprobs": lp, "finish_reason": reason}
                else:
                    choice = {
                        "index": i,
                        "text": delta,
                        "logprobs": lp,
                        "finish_reason": c.finish_reason,
                    }
                yield self._chunk([choice])
        except SlimserveError as e:  # after the first byte: the stream ends with an error event
            err = {"error": {"message": str(e), "type": e.error_type, "param": None, "code": None}}
            yield f"data: {json.dumps(err)}\n\n"
            return
        if self.body.include_usage:
            yield self._chunk([], self.usage())
        yield "data: [DONE]\n\n"


def _ranked(entry: dict[int, float], n: int | None) -> list[tuple[int, float]]:
    """The entry's `n` most likely tokens, best first."""
    return sorted(entry.items(), key=lambda kv: -kv[1])[: n or 0]
