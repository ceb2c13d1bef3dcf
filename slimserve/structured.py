"""Structured outputs: JSON schema, JSON object, regex, choice and Lark grammar constraints, as a
token mask from llguidance applied by the sampler.

A request's constraint compiles to an llguidance grammar when the request is made (a bad schema or
regex is an InvalidRequest naming the field, before anything is queued), and gets a matcher of
its own. Each step, `GrammarMask` masks the logits of the request's rows to the tokens the grammar
allows next; a verify of k drafts has k + 1 rows, and the matcher walks through the drafts to
mask each row at its own position, then rolls them back. The engine advances the matcher by the
tokens it accepts (`Grammar.accept`), and a request whose grammar is complete stops there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from slimserve.errors import InvalidRequest

_BITS = torch.arange(32, dtype=torch.int32)


@dataclass(frozen=True, slots=True)
class StructuredOutputs:
    """One constraint, named as vLLM's StructuredOutputsParams: `json` a JSON schema (a dict or
    its text), `json_object` any JSON object, `regex`, `choice` (one of the strings, exactly), or
    `grammar` (llguidance's Lark dialect). `param` names the request field it came from, for
    errors."""

    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    param: str = "structured_outputs"

    def __post_init__(self):
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice))
        given = [
            self.json is not None, self.json_object, self.regex is not None,
            self.choice is not None, self.grammar is not None,
        ]  # fmt: skip
        if sum(given) != 1:
            raise InvalidRequest(
                "give exactly one of json, json_object, regex, choice, grammar", param=self.param
            )
        if self.choice is not None and (
            not self.choice or any(not isinstance(c, str) or not c for c in self.choice)
        ):
            raise InvalidRequest("choice must be a non-empty list of strings", param=self.param)

    def grammar_text(self) -> str:
        """The constraint as an llguidance grammar (not yet checked)."""
        import llguidance

        M = llguidance.LLMatcher
        if self.json is not None or self.json_object:
            schema = self.json if self.json is not None else {"type": "object"}
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except ValueError as e:
                    raise InvalidRequest(f"the JSON schema is not JSON: {e}", self.param) from e
            if not isinstance(schema, dict | bool):
                raise InvalidRequest("a JSON schema must be an object", param=self.param)
            try:
                return M.grammar_from_json_schema(schema, overrides={"whitespace_flexible": False})
            except ValueError as e:
                raise InvalidRequest(f"invalid JSON schema: {e}", param=self.param) from e
        if self.regex is not None:
            return M.grammar_from_regex(self.regex)
        if self.choice is not None:
            alternatives = " | ".join(json.dumps(c) for c in self.choice)
            return M.grammar_from_lark(f"start: {alternatives}")
        return M.grammar_from_lark(self.grammar)


class GrammarCompiler:
    """The model's tokenizer as llguidance sees it (built once per engine, ~1 s), and the
    checking of a request's constraint against it."""

    def __init__(self, tokenizer, vocab_size: int):
        import llguidance

        self._llg = llguidance
        eos = min(tokenizer.eos_ids) if tokenizer.eos_ids else None
        # The logits' width is the model's; the tokenizer's own may be narrower.
        self.tokenizer = llguidance.LLTokenizer(
            tokenizer.fast.to_str(), n_vocab=vocab_size, eos_token=eos
        )
        self.vocab_size = vocab_size
        self.eos_id = eos

    def compile(self, spec: StructuredOutputs) -> Grammar:
        text = spec.grammar_text()
        is_error, messages = self._llg.LLMatcher.validate_grammar_with_warnings(
            text, self.tokenizer
        )
        if is_error:
            raise InvalidRequest(f"invalid constraint: {messages[0]}", param=spec.param)
        matcher = self._llg.LLMatcher(self.tokenizer, text, log_level=0)
        if matcher.is_error():
            raise InvalidRequest(f"invalid constraint: {matcher.get_error()}", param=spec.param)
        return Grammar(matcher, self.vocab_size)


class Grammar:
    """A request's matcher: what it allows next, and the tokens accepted so far."""

    def __init__(self, matcher, vocab_size: int):
        self.matcher, self.vocab_size = matcher, vocab_size

    def allowed(self) -> torch.Tensor:
        """(V,) bool: the tokens the grammar allows next."""
        words = torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.int32)
        bits = (words.unsqueeze(1) >> _BITS) & 1
        return bits.flatten()[: self.vocab_size].bool()

    def accept(self, token: int) -> None:
        """Advance by an accepted token. A token the grammar refuses (only possible when every
        token was masked) leaves the matcher in error: `failed` says so."""
        self.matcher.consume_token(token)

    @property
    def failed(self) -> str | None:
        return self.matcher.get_error() or None if self.matcher.is_error() else None

    @property
    def done(self) -> bool:
        """Nothing but the end may follow: the output is complete."""
        return self.matcher.is_stopped()


class GrammarMask:
    """The sampler's logits processor for constrained rows (SamplingRow.grammar set)."""

    def applies(self, row) -> bool:
        return row.grammar is not None

    def __call__(self, logits: torch.Tensor, rows) -> torch.Tensor:
        logits = logits.clone()
        i = 0
        while i < len(rows):
            g = rows[i].grammar
            if g is None:
                i += 1
                continue
            # The request's rows are consecutive: its last token's, then one per draft. Row j
            # is masked after the drafts before it; a draft the grammar refuses is never
            # accepted (the row before it cannot draw it), so later rows keep the last mask.
            start, consumed, allowed = rows[i].position, 0, None
            while i < len(rows) and rows[i].grammar is g:
                r = rows[i]
                while consumed < r.position - start:
                    if not g.matcher.try_consume_tokens([r.tokens[start + consumed]]):
                        break
                    consumed += 1
                if allowed is None or consumed == r.position - start:
                    allowed = g.allowed()
                logits[i].masked_fill_(~allowed, float("-inf"))
                i += 1
            if consumed:
                g.matcher.rollback(consumed)
        return logits
