"""Corpus lookup: continuations of the context's suffix n-gram in a fixed token corpus (training-free).

A retrieval datastore in the spirit of REST (He et al., 2024): the corpus is text the target
wrote itself (the committed self-distillation answers for the embedded model), so its frequent
phrasings are the target's. For every n-gram length ``n`` in ``min_ngram .. max_ngram`` the index
holds the 64-bit polynomial hash of each corpus n-gram, sorted, beside the position that follows
it; a lookup hashes the context's last ``n`` tokens (longest ``n`` first) and binary-searches.
Records are joined with a separator that no n-gram or continuation crosses. A hash collision can
only make a draft worse, never the output: verification decides every token.

The continuations of up to ``max_occurrences`` occurrences (spread over the corpus) are counted,
and the ``max_matches`` most frequent distinct ones come back with their counts, so a shared
prefix carries the share of occurrences that agree on it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from drafters.lookup import Continuation

SEPARATOR = -1
HASH_BASE = np.uint64(1_000_003)


def ngram_hashes(windows: np.ndarray) -> np.ndarray:
    """``[N, n]`` int64 token windows -> ``[N]`` uint64 hashes (wrapping arithmetic)."""
    h = np.zeros(len(windows), dtype=np.uint64)
    for col in windows.T:
        h = h * HASH_BASE + (col + 1).astype(np.uint64)
    return h


class CorpusIndex:
    """Sorted n-gram hashes of a token corpus (see the module docstring)."""

    def __init__(self, corpus: np.ndarray, max_ngram: int = 4, min_ngram: int = 2, max_depth: int = 6,
                 max_matches: int = 4, max_occurrences: int = 64):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"corpus n-gram range {min_ngram}..{max_ngram} is empty")
        self.corpus = np.concatenate([np.asarray(corpus, dtype=np.int64), [SEPARATOR] * max_depth])  # [N + depth]
        self.max_ngram, self.min_ngram, self.max_depth = max_ngram, min_ngram, max_depth
        self.max_matches, self.max_occurrences = max_matches, max_occurrences
        self.tables: dict[int, tuple[np.ndarray, np.ndarray]] = {}    # n -> (sorted hashes [M], next pos [M])
        n_tokens = len(corpus)
        for n in range(min_ngram, max_ngram + 1):
            if n_tokens <= n:
                continue
            starts = np.arange(n_tokens - n)                          # n-grams followed by a token
            windows = self.corpus[starts[:, None] + np.arange(n + 1)]  # [M, n + 1]: n-gram and its next token
            keep = (windows >= 0).all(axis=1)
            hashes = ngram_hashes(windows[keep, :n])
            order = np.argsort(hashes, kind="stable")
            self.tables[n] = (hashes[order], (starts[keep] + n)[order])

    @classmethod
    def from_records(cls, records: list[list[int]], **options) -> CorpusIndex:
        """An index of ``records`` (token lists), joined with separators."""
        joined = [tok for record in records for tok in [*record, SEPARATOR]]
        return cls(np.array(joined, dtype=np.int64), **options)

    @classmethod
    def from_distillations(cls, data: str | Path, **options) -> CorpusIndex:
        """An index of the answers (prompts left out) in ``treespec distill`` folders (one, or several
        comma-joined, as ``train-drafter --data``)."""
        from drafters.train.features import distilled_shards

        return cls.from_shards(distilled_shards(data), **options)

    @classmethod
    def from_shards(cls, shards: Iterable[list[dict]], **options) -> CorpusIndex:
        """An index of the answers (prompts left out) of distillation shards' records
        (``drafters.train.features.shard_records``)."""
        return cls.from_records([r["input_ids"][r["prompt_len"]:] for shard in shards for r in shard], **options)

    @property
    def num_tokens(self) -> int:
        return len(self.corpus) - self.max_depth

    def continuations(self, ids: list[int]) -> list[Continuation]:
        """Up to ``max_matches`` distinct continuations (at most ``max_depth`` tokens, most frequent first, each
        with its ``count`` among the sampled occurrences) of the longest suffix n-gram of ``ids`` found in
        the corpus; all share one ``match_len`` and ``total`` (the occurrences sampled)."""
        for n in range(min(self.max_ngram, len(ids)), self.min_ngram - 1, -1):
            if n not in self.tables:
                continue
            hashes, nexts = self.tables[n]
            key = ngram_hashes(np.asarray(ids[-n:], dtype=np.int64)[None, :])   # [1]
            lo, hi = np.searchsorted(hashes, key[0], "left"), np.searchsorted(hashes, key[0], "right")
            if hi == lo:
                continue
            picks = np.linspace(lo, hi - 1, min(hi - lo, self.max_occurrences)).astype(np.int64)
            follow = self.corpus[nexts[picks][:, None] + np.arange(self.max_depth)]   # [occ, depth]
            counts = Counter(tuple(row[:row.index(SEPARATOR)] if SEPARATOR in row else row)
                             for row in follow.tolist())
            return [Continuation(list(toks), n, count, len(picks))
                    for toks, count in counts.most_common(self.max_matches) if toks]
        return []
