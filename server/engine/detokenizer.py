"""Incremental, UTF-8-safe detokenization and stop-string handling for one request."""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    A multi-byte character split across tokens decodes to U+FFFD until its last
    byte arrives, so text ending in U+FFFD is held back. Decoding a short window
    (``prefix_offset``..) keeps each step O(1) in the output length.
    With stop strings, the last ``max(len(stop)) - 1`` characters are held back
    until it is clear they do not start a stop string.
    """

    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""       # all decoded output text
        self.emitted = 0     # characters of ``text`` already returned
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, tokens: list[int], final: bool = False) -> str:
        """Feed new tokens; returns the text that may be sent now. Sets ``stopped`` on a stop string."""
        for tok in tokens:
            self.ids.append(tok)
            prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
            full = self._decode(self.ids[self.prefix_offset:])
            if len(full) > len(prefix) and not full.endswith(REPLACEMENT):
                self.text += full[len(prefix):]
                self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        if self._find_stop():
            final = True
        end = len(self.text) if final else max(self.emitted, len(self.text) - self.holdback)
        delta, self.emitted = self.text[self.emitted:end], end
        return delta

    def _find_stop(self) -> bool:
        start = max(0, self.emitted - self.holdback)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.emitted = min(self.emitted, len(self.text))
            self.stopped = True
        return bool(hits)

    def flush(self) -> str:
        """Everything still held back (called when the request finishes)."""
        delta, self.emitted = self.text[self.emitted:], len(self.text)
        return delta
