"""OpenAI request bodies (what we accept) and the mapping onto SamplingParams.

Every field is checked against what the engine can represent before anything runs: integers
within int64 (and within meaningful bounds), finite floats, strings that encode as UTF-8 (JSON
lets a lone surrogate such as "\\ud800" through, which no tokenizer takes), lists of bounded
length. Fields that would change a request's meaning and that we do not implement (tools,
response_format, logit_bias, ...) are refused with a 400 naming them, never ignored; fields that
change nothing we use (user, metadata, ...) are ignored, as vLLM does.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from slimserve.config import PRIORITY_RANGE
from slimserve.errors import InvalidRequest
from slimserve.sampling_params import SamplingParams
from slimserve.structured import StructuredOutputs

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
TOKEN_ID_MAX = 2**31 - 1  # beyond any vocabulary; the engine checks the model's own
MAX_LIST = 4096  # messages, prompts, token id lists of stop tokens
MAX_STOP = 16


def _encodes(s: str) -> str:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (it holds a lone surrogate)") from None
    return s


Text = Annotated[str, AfterValidator(_encodes)]
Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
TokenId = Annotated[int, Field(ge=0, le=TOKEN_ID_MAX)]

# Fields of OpenAI's or vLLM's API that change what a request means, with the values that change
# nothing (accepted). Any other value is refused: answering free text to a request for a schema
# or a tool call would be a silent wrong answer.
_UNSUPPORTED: dict[str, tuple] = {
    "functions": (None, []),
    "function_call": (None, "none"),
    "logit_bias": (None, {}),
    "prompt_logprobs": (None,),
    "suffix": (None, ""),
    "echo": (None, False),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
}


def _refuse_unsupported(cls, data):
    if isinstance(data, dict):
        for name, fine in _UNSUPPORTED.items():
            # A request kind that implements one of them declares it as a field.
            if name in data and data[name] not in fine and name not in cls.model_fields:
                raise InvalidRequest(f"{name} is not supported by this server", param=name)
        best_of = data.get("best_of")
        if best_of is not None and best_of != data.get("n", 1):
            raise InvalidRequest("best_of other than n is not supported", param="best_of")
    return data


class StreamOptions(BaseModel):
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: Text | None = None
    description: Text | None = None
    # OpenAI's field is "schema"; pydantic's BaseModel has a method of that name.
    json_schema: dict | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsField(BaseModel):
    """vLLM's `structured_outputs` request field (its current names)."""

    model_config = ConfigDict(extra="forbid")

    json_: dict | bool | Text | None = Field(default=None, alias="json")
    regex: Text | None = None
    choice: Annotated[list[Text], Field(min_length=1, max_length=MAX_LIST)] | None = None
    grammar: Text | None = None
    json_object: bool | None = None


def _constraint(req) -> StructuredOutputs | None:
    """The one constraint a request asks for, from whichever field it came in."""
    found = []
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        found.append(StructuredOutputs(json_object=True, param="response_format"))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.json_schema is None:
            raise InvalidRequest(
                "response_format of type json_schema needs json_schema.schema",
                param="response_format",
            )
        found.append(StructuredOutputs(json=rf.json_schema.json_schema, param="response_format"))
    so = req.structured_outputs
    if so is not None:
        given = {k: v for k, v in (("json", so.json_), ("regex", so.regex), ("choice", so.choice),
                                   ("grammar", so.grammar)) if v is not None}  # fmt: skip
        if so.json_object:
            given["json_object"] = True
        found.append(StructuredOutputs(**given, param="structured_outputs"))
    for name, key in (("guided_json", "json"), ("guided_regex", "regex"),
                      ("guided_choice", "choice"), ("guided_grammar", "grammar")):  # fmt: skip
        value = getattr(req, name)
        if value is not None:
            found.append(StructuredOutputs(**{key: value}, param=name))
    if len(found) > 1:
        raise InvalidRequest(
            "a request takes one constraint: response_format, structured_outputs or a guided_*"
            " field", param=found[1].param,
        )  # fmt: skip
    return found[0] if found else None


class _Common(BaseModel):
    # Fields other servers accept that change nothing we do are ignored, as vLLM does.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: Text | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=INT64_MAX)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Text | Annotated[list[Text], Field(max_length=MAX_STOP)] | None = None
    seed: Int64 | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    user: Text | None = None
    # vLLM's extra sampling fields
    top_k: int = Field(default=0, ge=-1, le=INT64_MAX)  # past the vocabulary: all of it
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    ignore_eos: bool = False
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_LIST)] | None = None
    # slimserve's: false keeps this request out of speculative decoding (same output either way)
    speculative: bool = True
    # slimserve's: an agent's conversation id; with --session-ttl its KV outlives the request
    session_id: Text | None = None
    # vLLM's: lower runs first (--scheduling-policy priority); a 32-bit integer
    priority: int = Field(default=0, ge=PRIORITY_RANGE[0], le=PRIORITY_RANGE[1])
    # Constraints: OpenAI's, vLLM's current field, and vLLM's earlier (removed in its v0.12) ones.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsField | None = None
    guided_json: dict | bool | Text | None = None
    guided_regex: Text | None = None
    guided_choice: Annotated[list[Text], Field(min_length=1, max_length=MAX_LIST)] | None = None
    guided_grammar: Text | None = None

    _refuse = model_validator(mode="before")(classmethod(_refuse_unsupported))

    def sampling_params(
        self, max_tokens: int, index: int, logprobs: int | None, prompt_logprobs: int | None = None
    ) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=None if self.seed is None else (self.seed + index) & INT64_MAX,
            stop=tuple(stop),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            speculative=self.speculative,
            structured=_constraint(self),
            session_id=self.session_id,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str
    text: Text | None = None

    @model_validator(mode="after")
    def _text_only(self):
        if self.type != "text":
            raise ValueError(f"content parts of type {self.type!r} are not supported (only text)")
        if self.text is None:
            raise ValueError("a text content part needs a string 'text'")
        return self


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: Text
    arguments: Text | dict = "{}"


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: Text | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")]
    description: Text | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    function: FunctionSpec


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: dict


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Text | Annotated[list[ContentPart], Field(max_length=MAX_LIST)] | None = None
    tool_calls: Annotated[list[ToolCall], Field(max_length=MAX_LIST)] | None = None
    tool_call_id: Text | None = None
    name: Text | None = None

    def as_dict(self) -> dict:
        """The message as chat templates take it."""
        out = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            out["name"] = self.name
        return out

    def text(self) -> str:
        if isinstance(self.content, list):  # [{"type": "text", "text": ...}, ...]
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_LIST)
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(BaseModel):
    """POST /tokenize: vLLM's fields (prompt or messages) and llama-server's (content)."""

    model_config = ConfigDict(extra="forbid")

    model: Text | None = None
    prompt: Text | None = None
    content: Text | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_LIST)] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    with_pieces: bool = False  # llama-server's: each token's text beside its id

    @model_validator(mode="after")
    def _one_input(self):
        given = [k for k in ("prompt", "content", "messages") if getattr(self, k) is not None]
        if len(given) != 1:
            raise InvalidRequest("give exactly one of prompt, content or messages", "prompt")
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Text | None = None
    tokens: Annotated[list[TokenId], Field(max_length=1 << 20)]


class CompletionRequest(_Common):
    prompt: (
        Text
        | Annotated[list[Text], Field(min_length=1, max_length=MAX_LIST)]
        | Annotated[list[TokenId], Field(min_length=1)]
        | Annotated[
            list[Annotated[list[TokenId], Field(min_length=1)]],
            Field(min_length=1, max_length=MAX_LIST),
        ]
    )
    logprobs: int | None = Field(default=None, ge=0, le=5)
    # The prompt comes back before the completion (and with logprobs, each prompt token's): how
    # evaluation harnesses score a text. max_tokens may then be 0, to score and draw nothing.
    echo: bool = False
    max_tokens: int | None = Field(default=None, ge=0, le=INT64_MAX)

    @model_validator(mode="after")
    def _zero_tokens_only_with_echo(self):
        if self.max_tokens == 0 and not self.echo:
            raise InvalidRequest("max_tokens must be at least 1 (0 only with echo)", "max_tokens")
        return self

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [p]
        return list(p)
