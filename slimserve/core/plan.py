"""The step plan: what the scheduler chose, as backend-neutral query rows.

Every scheduled token is one query row of the flat batch. A request's rows are consecutive and
share its block table; row i of a span sits at position `start + i`, attends to `start + i + 1`
tokens (itself and everything before it), and needs logits when its next token is to be drawn.
A decoding request has one row; a request verifying k draft tokens has k + 1 (its last token and
the drafts), each of which needs logits; a prompt chunk has many, of which at most the last needs
logits. The plan says nothing about kernels: each attention backend turns it into metadata of its
own (slimserve/backends).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from slimserve.core.request import Request
from slimserve.kv_cache.ops import KVOp


@dataclass(slots=True)
class Span:
    """One request's rows in the step."""

    req: Request
    start: int  # num_computed_tokens when the step began: the first row's position
    num_rows: int
    first_row: int  # where the rows begin in the flat batch
    table: list[int]  # the request's block ids (in the KV group the plan is viewed for)
    # Rows that each read the cache on their own (a decode, or a verify of drafts) rather than a
    # chunk of prompt attended as one causal block.
    decode: bool
    num_drafts: int  # draft tokens among the rows (the last ones)
    logits_from: int  # first row (within the span) that needs logits; num_rows when none does
    # Of the logits rows, the first ones that score the prompt (prompt_logprobs) rather than
    # draw a token: row j gives the log-probability of prompt token start + j + 1.
    prompt_rows: int = 0
    tables: tuple[list[int], ...] = ()  # its block ids in every KV group (the first: `table`)

    @property
    def rows(self) -> range:
        return range(self.first_row, self.first_row + self.num_rows)

    @property
    def num_logits(self) -> int:
        return self.num_rows - self.logits_from

    @property
    def num_samples(self) -> int:
        """Rows that draw a token (the last real one and any drafts)."""
        return self.num_logits - self.prompt_rows


@dataclass(slots=True)
class StepPlan:
    spans: list[Span]  # decode spans first, then prompt chunks
    input_ids: torch.Tensor  # (T,) int64
    positions: torch.Tensor  # (T,) int64
    slot_mapping: torch.Tensor  # (T,) int64: the KV slot each row writes
    logits_rows: torch.Tensor  # (R,) int64: rows whose logits are computed, span by span
    block_size: int
    # Per KV group (kv_cache/spec.py) past the first: the slots each row writes in it.
    group_slots: tuple[torch.Tensor, ...] = ()

    @property
    def num_groups(self) -> int:
        return 1 + len(self.group_slots)

    def group(self, g: int) -> StepPlan:
        """The plan as KV group `g` sees it: its block tables and slots (the plan itself for
        group 0)."""
        if g == 0:
            return self
        spans = [dataclasses.replace(s, table=s.tables[g]) for s in self.spans]
        return dataclasses.replace(self, spans=spans, slot_mapping=self.group_slots[g - 1])

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def decode_only(self) -> bool:
        return all(s.decode for s in self.spans)

    def split_logits(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(rows that draw a token, rows that score the prompt), span by span in each; the second
        is None when no span scores its prompt."""
        if not any(s.prompt_rows for s in self.spans):
            return logits, None
        draw, score, i = [], [], 0
        for s in self.spans:
            score += range(i, i + s.prompt_rows)
            draw += range(i + s.prompt_rows, i + s.num_logits)
            i += s.num_logits
        return logits[draw], logits[score]


def build_plan(
    scheduled: list[tuple[Request, int]],
    tables: dict[str, list[int]],
    block_size: int,
    all_logits: bool = False,
) -> StepPlan:
    """The plan for requests each given `n` new rows; `tables` holds their block ids (a list,
    or one per KV group). With `all_logits`, every row needs logits (evaluation: the logits at
    every position)."""
    decodes, chunks = [], []
    for req, n in scheduled:
        start = req.num_computed_tokens
        # The last real token (and any drafts after it), or a single token: each row reads the
        # cache by itself. Otherwise a chunk of prompt.
        (decodes if n == 1 or start >= req.num_tokens - 1 else chunks).append((req, n))
    spans, ids, pos, logits_rows = [], [], [], []
    bs = block_size
    first = next(iter(tables.values()), [])
    num_groups = 1 if isinstance(first, list) else len(first)
    slots = [[] for _ in range(num_groups)]
    for req, n in decodes + chunks:
        start, group_tables = req.num_computed_tokens, tables[req.request_id]
        if num_groups == 1 and isinstance(group_tables, list):
            group_tables = (group_tables,)
        table = group_tables[0]
        tokens = req.all_token_ids + req.spec_token_ids if req.spec_token_ids else req.all_token_ids
        end = start + n
        # Logits from the row of the last real token on: it and every draft row draw a token.
        logits_from = max(0, req.num_tokens - 1 - start) if end >= req.num_tokens else n
        prompt_rows = 0
        if req.wants_prompt_logprobs:
            prompt_rows = max(0, min(end, req.num_prompt_tokens - 1) - start)
        if all_logits or prompt_rows:
            logits_from = 0
        span = Span(
            req, start, n, len(ids), table, start >= req.num_tokens - 1 or n == 1,
            max(0, end - req.num_tokens), logits_from, prompt_rows, group_tables,
        )  # fmt: skip
        spans.append(span)
        logits_rows += range(span.first_row + logits_from, span.first_row + n)
        ids += tokens[start:end]
        pos += range(start, end)
        for g, t in enumerate(group_tables):
            slots[g] += [t[p // bs] * bs + p % bs for p in range(start, end)]
    return StepPlan(
        spans,
        torch.tensor(ids, dtype=torch.long),
        torch.tensor(pos, dtype=torch.long),
        torch.tensor(slots[0], dtype=torch.long),
        torch.tensor(logits_rows, dtype=torch.long),
        block_size,
        tuple(torch.tensor(s, dtype=torch.long) for s in slots[1:]),
    )


@dataclass(slots=True)
class SchedulerOutput:
    """What runs this step: each request with its number of new rows (drafts included), in the
    order chosen; and who gave way."""

    scheduled: list[tuple[Request, int]] = field(default_factory=list)  # (request, new rows)
    preempted: list[Request] = field(default_factory=list)
    kv_ops: list[KVOp] = field(default_factory=list)  # page movements before the forward

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)

    @property
    def num_scheduled_tokens(self) -> dict[str, int]:
        return {r.request_id: n for r, n in self.scheduled}
