"""What llama-server users expect beside the OpenAI API: the chat page at / and its files,
POST /tokenize and /detokenize, GET /props. The API key guards all but the page (api._Guard)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from slimserve.errors import InvalidRequest
from slimserve.server.protocol import DetokenizeRequest, TokenizeRequest

if TYPE_CHECKING:
    from slimserve.server.api import Server

STATIC = Path(__file__).parent / "static"
PAGE_FILES = {"chat.js": "text/javascript", "chat.css": "text/css"}
NO_CACHE = {"Cache-Control": "no-cache"}  # a new slimserve's page, not the browser's old copy

router = APIRouter()


@router.get("/", include_in_schema=False)
async def chat_page():
    return FileResponse(STATIC / "index.html", headers=NO_CACHE)


@router.get("/static/{name}", include_in_schema=False)
async def page_file(name: str):
    from slimserve.server.api import ApiError

    if name not in PAGE_FILES:
        raise ApiError(404, f"no such file: {name}", "invalid_request_error")
    return FileResponse(STATIC / name, media_type=PAGE_FILES[name], headers=NO_CACHE)


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request):
    srv: Server = request.app.state.server
    srv.check_model(body.model)
    tok = srv.tokenizer
    if body.messages is not None:
        text = tok.apply_chat_template(
            [m.as_dict() for m in body.messages], body.add_generation_prompt
        )
        ids = tok.encode(text)  # as the chat endpoint encodes its prompt
    else:
        text = body.prompt if body.prompt is not None else body.content
        ids = tok.encode(text, add_special_tokens=body.add_special_tokens)
    tokens = [{"id": t, "piece": srv.token_text(t)} for t in ids] if body.with_pieces else ids
    return {"tokens": tokens, "count": len(ids), "max_model_len": srv.max_model_len}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request):
    srv: Server = request.app.state.server
    srv.check_model(body.model)
    vocab = srv.engine.engine.model_config.vocab_size
    bad = next((i for i, t in enumerate(body.tokens) if t >= vocab), None)
    if bad is not None:
        raise InvalidRequest(
            f"token id {body.tokens[bad]} is past the vocabulary ({vocab} tokens)",
            param=f"tokens.{bad}",
        )
    text = srv.tokenizer.decode(body.tokens, skip_special_tokens=False)
    return {"prompt": text, "content": text}  # vLLM's name and llama-server's


@router.get("/props")
async def props(request: Request):
    """The model and the engine's settings."""
    srv: Server = request.app.state.server
    e = srv.engine.engine
    cfg, mc, spec = e.config, e.model_config, e.kv_spec
    return {
        "model": srv.served_name,
        "model_path": e.model_name,
        "architecture": mc.architecture,
        "max_model_len": srv.max_model_len,
        "vocab_size": mc.vocab_size,
        "quantization": e.model.quantization,
        "kv_cache": {
            "dtype": cfg.cache.dtype,
            "block_size": spec.block_size,
            "num_blocks": spec.num_blocks,
            "capacity_tokens": e.capacity_tokens,
            "prefix_caching": cfg.cache.enable_prefix_caching,
            "session_ttl": cfg.cache.session_ttl,
            "max_sessions": cfg.cache.max_sessions,
            # per KV group: its layers and window (0: full attention)
            "groups": [
                {"layers": list(g), "window": s.window}
                for g, s in zip(spec.groups, spec.group_specs)
            ],
        },
        "engine": {
            "max_num_seqs": cfg.scheduler.max_num_seqs,
            "max_num_batched_tokens": cfg.scheduler.max_num_batched_tokens,
            "speculative": cfg.speculative.method,
            "attention_backend": e.runner.backend.name,
            "num_threads": torch.get_num_threads(),
        },
        "chat_template": srv.tokenizer.chat_template,
        # Bytes of each part --memory-budget covers (engine/memory.py), and the budget.
        "memory": {"budget": cfg.memory_budget, **e.memory()},
        "kv_disk_cache": _disk_props(e),
    }


def _disk_props(e) -> dict | None:
    tier = e.kv.tier
    if tier is None:
        return None
    return {"dir": str(tier.dir), "max_bytes": tier.max_bytes, "bytes": tier.stats.bytes,
            "pages": len(tier), "saving": tier.saving}  # fmt: skip
