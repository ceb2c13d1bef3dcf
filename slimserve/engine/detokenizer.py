"""Incremental detokenization with stop strings found across token boundaries."""

from __future__ import annotations

from slimserve.loader.tokenizer import Tokenizer
from slimserve.sampling_params import SamplingParams


class Detokenizer:
    def __init__(self, tokenizer: Tokenizer, params: SamplingParams):
        self._fast = tokenizer.fast
        self._stream = tokenizer.detokenizer(params.skip_special_tokens)
        self.stops = params.stop
        # While streaming, hold back text that could still turn out to begin a stop string.
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""

    def add(self, token_id: int) -> bool:
        """Append one token's text; True if a stop string appeared (the text is cut before it)."""
        chunk = self._stream.step(self._fast, token_id)
        if not chunk:
            return False
        search_from = max(0, len(self.text) - self.hold)
        self.text += chunk
        if not self.stops:
            return False
        hits = [i for s in self.stops if (i := self.text.find(s, search_from)) != -1]
        if hits:
            self.text = self.text[: min(hits)]
            return True
        return False

    def visible_text(self, finished: bool) -> str:
        if finished or not self.hold:
            return self.text
        return self.text[: max(0, len(self.text) - self.hold)]
