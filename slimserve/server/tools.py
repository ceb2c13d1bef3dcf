"""OpenAI tool calling: tools into the prompt, a grammar when a call is required, and the
model's calls out of its text (whole, or as they complete in a stream).

A chat template that knows tools (it mentions `tools`) renders them itself. One that does not
gets the generic format: a system message listing the functions as JSON, asking for each call as
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (the convention Hermes- and
Qwen-style models are trained on); earlier calls and tool results in the conversation are
rendered in the same tags. Under `tool_choice` "required" or a named function the output is
constrained to such calls with arguments valid under the tool's parameter schema, so it always
parses; under "auto" the model may answer in text or call, and whatever parses as a call is one.
"""

from __future__ import annotations

import json
import re
import uuid

from slimserve.errors import InvalidRequest
from slimserve.structured import StructuredOutputs

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.S)

GENERIC_SYSTEM = (
    "You can call functions. They are listed below as JSON. To call one, reply with\n"
    + OPEN
    + '\n{"name": <function name>, "arguments": <arguments as a JSON object>}\n'
    + CLOSE
    + "\nfor each call, and nothing else; the results come back as tool messages. If no call is"
    " needed, answer normally.\n\nFunctions:\n"
)


class ToolPlan:
    """A request's tools and tool_choice, resolved: what to render, constrain and parse."""

    def __init__(self, tools: list[dict], choice, parallel: bool):
        self.tools = {t["function"]["name"]: t["function"] for t in tools}
        if isinstance(choice, dict):
            name = choice.get("function", {}).get("name")
            if name not in self.tools:
                raise InvalidRequest(f"tool_choice names {name!r}, which is not among the tools",
                                     param="tool_choice")  # fmt: skip
            self.choice = name
        else:
            self.choice = choice or "auto"
        self.parallel = parallel

    @property
    def active(self) -> bool:
        return self.choice != "none" and bool(self.tools)

    # -- into the prompt -------------------------------------------------------------------
    def render(self, tokenizer, messages: list[dict]) -> str:
        template = tokenizer.chat_template or ""
        if "tools" in template:
            specs = [{"type": "function", "function": f} for f in self.tools.values()]
            return tokenizer.apply_chat_template(messages, tools=specs if self.active else None)
        return tokenizer.apply_chat_template(self._generic(messages))

    def _generic(self, messages: list[dict]) -> list[dict]:
        out = []
        for m in messages:
            if m["role"] == "tool":
                out.append({"role": "user", "content": f"<tool_response>\n{m['content']}\n"
                                                       "</tool_response>"})  # fmt: skip
            elif m.get("tool_calls"):
                calls = "\n".join(
                    f"{OPEN}\n"
                    + json.dumps({"name": c["function"]["name"],
                                  "arguments": _arguments(c["function"].get("arguments"))})
                    + f"\n{CLOSE}"
                    for c in m["tool_calls"]
                )  # fmt: skip
                text = ((m["content"] or "") + "\n" + calls).strip()
                out.append({"role": m["role"], "content": text})
            else:
                out.append({"role": m["role"], "content": m["content"]})
        if self.active:
            listing = "\n".join(json.dumps(f) for f in self.tools.values())
            system = GENERIC_SYSTEM + listing
            if out and out[0]["role"] in ("system", "developer"):
                out[0] = {"role": out[0]["role"], "content": out[0]["content"] + "\n\n" + system}
            else:
                out.insert(0, {"role": "system", "content": system})
        return out

    # -- the constraint --------------------------------------------------------------------
    def constraint(self) -> StructuredOutputs | None:
        """A grammar of calls under "required" or a named function; None otherwise."""
        if not self.active or self.choice == "auto":
            return None
        names = [self.choice] if self.choice in self.tools else list(self.tools)
        alternatives = []
        for name in names:
            params = self.tools[name].get("parameters") or {"type": "object"}
            schema = {
                "type": "object",
                "properties": {"name": {"const": name}, "arguments": params},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            alternatives.append("%json " + json.dumps(schema))
        rules = "\n".join(f"call{i}: {a}" for i, a in enumerate(alternatives))
        body = " | ".join(f"call{i}" for i in range(len(alternatives)))
        # A named function is called once; "required" may call several when parallel calls
        # are allowed.
        repeat = '("\\n" one)*' if self.parallel and self.choice == "required" else ""
        grammar = f'start: one {repeat}\none: "{OPEN}\\n" ({body}) "\\n{CLOSE}"\n{rules}\n'
        return StructuredOutputs(grammar=grammar, param="tools")

    # -- out of the text -------------------------------------------------------------------
    def parse(self, text: str) -> tuple[str | None, list[dict]]:
        """(content, tool_calls): the calls that parse, and the text around them."""
        if not self.active:
            return text, []
        calls, content = [], text
        for m in _CALL.finditer(text):
            call = _call(m.group(1), self.tools)
            if call is not None:
                calls.append(call)
                content = content.replace(m.group(0), "", 1)
        if not calls:
            return text, []
        content = content.strip()
        return (content or None), calls


class StreamParser:
    """A streamed answer split into content deltas and completed calls: text that may be the
    start of a call is held back until it is one, or cannot be."""

    def __init__(self, plan: ToolPlan):
        self.plan, self.pending, self.calls = plan, "", 0

    def feed(self, delta: str, final: bool = False) -> tuple[str, list[dict]]:
        if not self.plan.active:
            return delta, []
        text, content, calls = self.pending + delta, "", []
        while True:
            start = text.find(OPEN)
            if start < 0:
                keep = 0 if final else _partial_suffix(text, OPEN)
                content, text = content + text[: len(text) - keep], text[len(text) - keep :]
                break
            end = text.find(CLOSE, start)
            if end < 0:
                content, text = content + text[:start], text[start:]
                if final:
                    content, text = content + text, ""
                break
            block = text[start : end + len(CLOSE)]
            call = _call(block[len(OPEN) : -len(CLOSE)].strip(), self.plan.tools)
            if call is None:
                content += block
            else:
                call["index"] = self.calls
                self.calls += 1
                calls.append(call)
            text = text[end + len(CLOSE) :].lstrip("\n") if call else text[end + len(CLOSE) :]
        self.pending = text
        return content, calls


def _call(payload: str, tools: dict) -> dict | None:
    try:
        obj = json.loads(payload)
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in tools:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)},
    }


def _arguments(raw) -> object:
    if isinstance(raw, str):
        try:
            return json.loads(raw)
        except ValueError:
            return raw
    return raw or {}


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that begins `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
