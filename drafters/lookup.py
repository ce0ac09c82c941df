"""Prompt-lookup drafting: continuations of earlier n-gram matches, merged into a tree (training-free)."""

from __future__ import annotations

from dataclasses import dataclass, field

from drafters.base import Drafter, DraftRequest
from drafters.tree import DraftTree


@dataclass
class Continuation:
    """The tokens that followed one earlier occurrence of the context's suffix n-gram."""

    tokens: list[int]
    match_len: int                # n: how many trailing context tokens matched
    count: int = 1                # occurrences that continued this way
    total: int = 0                # occurrences the counts are out of (0: one per continuation merged)


@dataclass
class LookupTrie:
    """Continuations merged on shared prefixes; nodes parent-before-child, ``-1`` = child of the root."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)      # root children at depth 1
    votes: list[int] = field(default_factory=list)       # occurrences whose continuation passes the node
    matches: int = 0                                     # occurrences merged (votes are out of this)


class LookupDrafter(Drafter):
    """Match the longest suffix n-gram (``max_ngram`` down to ``min_ngram``) of the committed tokens
    against the whole history; each match's continuation becomes a branch, most recent match
    first, shared prefixes merged. A node's score is minus its depth plus the share of matches
    that agree on it, so deeper and rarer continuations rank lower.
    """

    name = "lookup"

    def __init__(self, max_tree_tokens: int = 16, max_ngram: int = 3, min_ngram: int = 1,
                 max_depth: int = 8, max_matches: int = 4):
        self.max_tree_tokens = max_tree_tokens
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.max_depth, self.max_matches = max_depth, max_matches

    def propose(self, requests: list[DraftRequest]) -> list[DraftTree]:
        return [self._tree(r.token_ids, min(r.budget, self.max_tree_tokens)) for r in requests]

    def continuations(self, ids: list[int]) -> list[Continuation]:
        """Up to ``max_matches`` continuations (at most ``max_depth`` tokens each) of the longest suffix
        n-gram of ``ids`` that occurred before, most recent first; all share one ``match_len``."""
        for n in range(min(self.max_ngram, len(ids) - 1), self.min_ngram - 1, -1):
            suffix = ids[-n:]
            found = []
            for start in range(len(ids) - n - 1, -1, -1):  # most recent first, excluding the suffix itself
                if ids[start:start + n] == suffix:
                    found.append(Continuation(ids[start + n:start + n + self.max_depth], n))
                    if len(found) == self.max_matches:
                        break
            if found:
                return found
        return []

    @staticmethod
    def trie(conts: list[Continuation], budget: int | None = None) -> LookupTrie:
        """Merge ``conts`` in order on shared prefixes, creating at most ``budget`` nodes; a continuation
        votes with its ``count``."""
        trie = LookupTrie(matches=max([c.total for c in conts] + [sum(c.count for c in conts)]))
        children: dict[tuple[int, int], int] = {}
        for cont in conts:
            parent = -1
            for tok in cont.tokens:
                node = children.get((parent, tok))
                if node is None:
                    if len(trie.tokens) == budget:
                        break
                    node = children[(parent, tok)] = len(trie.tokens)
                    trie.tokens.append(tok)
                    trie.parents.append(parent)
                    trie.votes.append(0)
                    trie.depths.append(1 + (trie.depths[parent] if parent >= 0 else 0))
                trie.votes[node] += cont.count
                parent = node
        return trie

    def _tree(self, ids: list[int], budget: int) -> DraftTree:
        t = self.trie(self.continuations(ids), budget)
        scores = [-d + v / max(1, t.matches) for d, v in zip(t.depths, t.votes)]
        return DraftTree(t.tokens, t.parents, scores)
