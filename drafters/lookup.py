"""Prompt-lookup drafting: continuations of earlier n-gram matches, merged into a tree (training-free)."""

from __future__ import annotations

from drafters.base import Drafter, DraftRequest
from drafters.tree import DraftTree


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

    def _continuations(self, ids: list[int]) -> list[list[int]]:
        for n in range(min(self.max_ngram, len(ids) - 1), self.min_ngram - 1, -1):
            suffix = ids[-n:]
            found = []
            for start in range(len(ids) - n - 1, -1, -1):  # most recent first, excluding the suffix itself
                if ids[start:start + n] == suffix:
                    found.append(ids[start + n:start + n + self.max_depth])
                    if len(found) == self.max_matches:
                        break
            if found:
                return found
        return []

    def _tree(self, ids: list[int], budget: int) -> DraftTree:
        tokens: list[int] = []
        parents: list[int] = []
        votes: list[int] = []
        depth: list[int] = []
        children: dict[tuple[int, int], int] = {}
        conts = self._continuations(ids)
        for cont in conts:
            parent = -1
            for tok in cont:
                node = children.get((parent, tok))
                if node is None:
                    if len(tokens) == budget:
                        break
                    node = children[(parent, tok)] = len(tokens)
                    tokens.append(tok)
                    parents.append(parent)
                    votes.append(0)
                    depth.append(1 + (depth[parent] if parent >= 0 else 0))
                votes[node] += 1
                parent = node
        scores = [-d + v / max(1, len(conts)) for d, v in zip(depth, votes)]
        return DraftTree(tokens, parents, scores)
