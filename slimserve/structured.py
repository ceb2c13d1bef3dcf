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

import numpy as np
import torch

from slimserve.errors import InvalidRequest


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

    def forced(self, limit: int) -> list[int]:
        """The tokens the grammar allows as the only continuation from here (at most `limit`):
        keys, punctuation, the rest of an enum value."""
        return self.matcher.compute_ff_tokens()[:limit]

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
    """The sampler's logits processor for constrained rows (SamplingRow.grammar set).

    One call computes the masks of every constrained row of the step, in parallel across
    requests on llguidance's threads (the GIL released), into one int32 bitmask: a request's
    rows are consecutive (its last token's, then one per draft), and row j's mask is the
    grammar's after the drafts before it. A draft the grammar refuses is never accepted (the
    row before it cannot draw it), so the rows after it are left unmasked."""

    def __init__(self):
        self._executor = None
        self._pool = None  # one thread: masks computed while the step's forward runs
        self._pending = None  # (rows, future) from `prepare`

    def applies(self, row) -> bool:
        return row.grammar is not None

    def prepare(self, rows) -> None:
        """Start computing the masks of `rows` (the matchers' states are final before the
        forward: only accepted tokens move them), so they are ready when the logits are."""
        if not any(r.grammar is not None for r in rows):
            return
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(1, thread_name_prefix="slimserve-grammar")
        self._pending = (rows, self._pool.submit(self._masks, rows))

    def __call__(self, logits: torch.Tensor, rows) -> torch.Tensor:
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] is rows:
            at, words = pending[1].result()
        else:
            at, words = self._masks(rows)
        allowed = _unpack(words, logits.shape[-1])
        if len(at) == len(rows):
            return torch.where(allowed, logits, float("-inf"))
        logits = logits.clone()
        idx = torch.tensor(at)
        logits[idx] = torch.where(allowed, logits[idx], float("-inf"))
        return logits

    def _masks(self, rows) -> tuple[list[int], torch.Tensor]:
        """(the constrained rows, their int32 bitmasks)."""
        import llguidance

        if self._executor is None:
            self._executor = llguidance.LLExecutor()
        at, jobs = [], []  # jobs: (matcher, its first mask's place, the drafts after it)
        i = 0
        while i < len(rows):
            g = rows[i].grammar
            if g is None:
                i += 1
                continue
            j = i
            while j < len(rows) and rows[j].grammar is g:
                j += 1
            drafts = rows[i].tokens[rows[i].position : rows[j - 1].position]
            jobs.append((g.matcher, len(at), drafts))
            at += range(i, j)
            i = j
        words = torch.full((len(at), (g.vocab_size + 31) // 32), -1, dtype=torch.int32)
        ptr, size = words.data_ptr(), words.shape[1] * 4
        plain = [(m, k) for m, k, d in jobs if not d]
        if plain:
            self._executor.unsafe_compute_mask_ptr(plain, ptr, size, len(at))
        drafted = [job for job in jobs if job[2]]
        if drafted:
            self._executor.unsafe_compute_mask_ptr_with_draft_token(drafted, ptr, size, len(at))
        return at, words


def _unpack(words: torch.Tensor, V: int) -> torch.Tensor:
    """(R, ceil(V / 32)) int32 bitmasks -> (R, V) bool, lowest bit first (llguidance's order)."""
    bits = np.unpackbits(words.numpy().view(np.uint8), axis=-1, bitorder="little")[:, :V]
    return torch.from_numpy(bits).view(torch.bool)
