"""Hybrid drafting: prompt-lookup continuations grafted onto a model drafter's tree under one budget.

Each step the model drafter (EAGLE by default; any :class:`~drafters.base.Drafter`) proposes its
tree at the full budget, and prompt lookup (:class:`~drafters.lookup.LookupDrafter`) finds the
continuations of the context's longest earlier suffix n-gram (match length ``n``), merged into a
trie. The trie is grafted onto the model tree: a lookup path reuses model nodes while the tokens
agree and appends lookup-only nodes from there. Every score is a cumulative log-confidence::

    lookup node at depth d on v of the m continuations:  s_L = d * log p_n + log(v / m)
    node proposed by both (noisy-or):                    s   = log(1 - (1 - e^s_M) (1 - e^s_L))

so a shared node scores at least ``max(s_M, s_L)``. ``p_n`` is the request's running estimate of
how often a lookup token is the one the target commits, per match length ``n``: the prior
``lookup_prior`` worth ``prior_weight`` observations, plus decayed counts learned in
:meth:`HybridDrafter.on_accept` by comparing last step's continuations with the committed tokens
(``p_n = (w * p0 + hits_n) / (w + trials_n)``). Copy-heavy requests (RAG, summaries, code edits)
thus grow long lookup runs, and open-ended ones fall back to the model's tree. Scores are made
non-increasing along every path, then the union is reranked to ``min(budget, max_tree_tokens)``
nodes with ancestor closure enforced (:func:`drafters.tree.rerank`). Without a lookup match the
model's tree is returned unchanged. Drafting is deterministic, so verification stays lossless.

With a corpus index (:class:`~drafters.corpus.CorpusIndex`: text the target wrote, such as its
self-distillation answers) a second trie is grafted the same way: the most frequent continuations
of the context's suffix n-gram in the corpus, ``v / m`` being the share of the ``m`` sampled
occurrences through a node, with its own running estimate ``p_n`` (prior ``corpus_prior``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from drafters.base import AcceptUpdate, Drafter, DraftRequest
from drafters.corpus import CorpusIndex
from drafters.hybrid_config import HybridConfig
from drafters.lookup import Continuation, LookupDrafter, LookupTrie
from drafters.tree import DraftTree, rerank

__all__ = ["HybridConfig", "HybridDrafter", "either", "graft"]

@dataclass
class _Proposal:
    """Continuations of each source proposed below the root at position ``start``."""

    start: int
    lookup: list[Continuation]
    corpus: list[Continuation]


@dataclass
class _Evidence:
    """How often one source's tokens were committed, per n-gram match length (decayed counts)."""

    hits: dict[int, float] = field(default_factory=dict)     # match length -> tokens confirmed
    trials: dict[int, float] = field(default_factory=dict)   # match length -> tokens checked

    def estimate(self, match_len: int, prior: float, weight: float) -> float:
        return (weight * prior + self.hits.get(match_len, 0.0)) / (weight + self.trials.get(match_len, 0.0))

    def learn(self, conts: list[Continuation], committed: list[int], decay: float) -> None:
        """Count the tokens the target confirmed (``hits``: the longest agreeing prefix over the
        continuations) and, when every continuation that got that far proposed a wrong next token
        within the committed window, one miss."""
        lengths = [matched(c.tokens, committed) for c in conts]
        hits = max(lengths)
        missed = any(n == hits < min(len(c.tokens), len(committed)) for n, c in zip(lengths, conts))
        n = conts[0].match_len
        self.hits[n] = decay * self.hits.get(n, 0.0) + hits
        self.trials[n] = decay * self.trials.get(n, 0.0) + hits + int(missed)


@dataclass
class _State:
    """One request's acceptance evidence per source."""

    lookup: _Evidence = field(default_factory=_Evidence)
    corpus: _Evidence = field(default_factory=_Evidence)
    pending: _Proposal | None = None                          # last step's continuations, checked on accept


def either(a: float, b: float) -> float:
    """Log-probability that at least one of two independent events with log-probabilities ``a``, ``b``
    holds (noisy-or); never below ``max(a, b)``."""
    miss = (1.0 - min(1.0, math.exp(a))) * (1.0 - min(1.0, math.exp(b)))
    return max(a, b, math.log1p(-miss)) if miss < 1.0 else max(a, b)


def matched(tokens: list[int], committed: list[int]) -> int:
    """Length of the common prefix of a continuation and the committed tokens."""
    n = 0
    for a, b in zip(tokens, committed):
        if a != b:
            break
        n += 1
    return n


class HybridDrafter(Drafter):
    """Prompt lookup and a model drafter merged into one draft tree (see the module docstring)."""

    name = "hybrid"

    def __init__(self, model: Drafter, config: HybridConfig | None = None, max_tree_tokens: int | None = None,
                 corpus: CorpusIndex | None = None):
        self.model, self.corpus = model, corpus
        self.config = config or HybridConfig()
        c = self.config
        self.lookup = LookupDrafter(max_ngram=c.max_ngram, min_ngram=c.min_ngram, max_depth=c.max_lookup_depth,
                                    max_matches=c.max_matches)
        self.max_tree_tokens = max_tree_tokens or model.max_tree_tokens
        self.acceptance_profile = model.acceptance_profile
        self.aux_layers = model.aux_layers
        self.states: dict[str, _State] = {}

    def tree_shape(self) -> tuple[int, int] | None:
        return self.model.tree_shape()

    def lookup_acceptance(self, request_id: str, match_len: int) -> float:
        """Current estimate ``p_n`` that a lookup token from an ``n = match_len`` match is committed."""
        st = self.states.get(request_id) or _State()
        return st.lookup.estimate(match_len, self.config.lookup_prior, self.config.prior_weight)

    def corpus_acceptance(self, request_id: str, match_len: int) -> float:
        """The same estimate for corpus tokens from an ``n = match_len`` corpus match."""
        st = self.states.get(request_id) or _State()
        return st.corpus.estimate(match_len, self.config.corpus_prior, self.config.prior_weight)

    def propose(self, requests: list[DraftRequest]) -> list[DraftTree]:
        asks = [replace(r, budget=min(r.budget, self.max_tree_tokens)) for r in requests]
        trees = self.model.propose(asks)                          # one batched call, full budget
        return [self._merge(r, tree) for r, tree in zip(asks, trees)]

    def _merge(self, request: DraftRequest, tree: DraftTree) -> DraftTree:
        """The model ``tree`` with this request's lookup and corpus tries grafted on, reranked to the budget."""
        rid, ids = request.request_id, request.token_ids
        st = self.states.setdefault(rid, _State())
        conts = self.lookup.continuations(ids)
        found = self.corpus.continuations(ids) if self.corpus is not None else []
        st.pending = _Proposal(len(ids) - 1, conts, found) if conts or found else None
        if st.pending is None:
            return tree
        tokens, parents, scores = list(tree.tokens), list(tree.parents), list(tree.scores)
        for source, acceptance in ((conts, self.lookup_acceptance), (found, self.corpus_acceptance)):
            if source:
                log_p = math.log(acceptance(rid, source[0].match_len))
                graft(tokens, parents, scores, self.lookup.trie(source), log_p)
        for i, p in enumerate(parents):                           # non-increasing along paths
            if p >= 0:
                scores[i] = min(scores[i], scores[p])
        return rerank(tokens, parents, scores, request.budget)

    def enable_cuda_graphs(self, max_num_seqs: int, max_model_len: int) -> None:
        self.model.enable_cuda_graphs(max_num_seqs, max_model_len)

    def on_accept(self, updates: list[AcceptUpdate]) -> None:
        self.model.on_accept(updates)
        for u in updates:
            if u.reset or u.request_id not in self.states:
                self.states[u.request_id] = _State()
            st = self.states[u.request_id]
            proposal, st.pending = st.pending, None
            if proposal is not None and proposal.start == u.start:
                committed = u.fed_tokens[1:] + [u.next_token]
                for evidence, conts in ((st.lookup, proposal.lookup), (st.corpus, proposal.corpus)):
                    if conts:
                        evidence.learn(conts, committed, self.config.decay)

    def release(self, request_id: str) -> None:
        self.states.pop(request_id, None)
        self.model.release(request_id)


def graft(tokens: list[int], parents: list[int], scores: list[float], trie: LookupTrie, log_p: float) -> None:
    """Merge ``trie`` into the pool ``tokens``/``parents``/``scores`` in place: a trie node whose
    parent's pool node already has a child with its token combines scores with it (:func:`either`),
    others are appended (parents stay before children)."""
    child = {(p, t): i for i, (p, t) in reversed(list(enumerate(zip(parents, tokens))))}  # first sibling wins
    where: list[int] = []                                         # trie node -> pool node
    for tok, par, depth, votes in zip(trie.tokens, trie.parents, trie.depths, trie.votes):
        parent = where[par] if par >= 0 else -1
        s_lookup = depth * log_p + math.log(votes / trie.matches)
        node = child.get((parent, tok))
        if node is None:
            node = child[(parent, tok)] = len(tokens)
            tokens.append(tok)
            parents.append(parent)
            scores.append(s_lookup)
        else:
            scores[node] = either(scores[node], s_lookup)
        where.append(node)
