"""Corpus lookup index: longest suffix match, counted continuations, separators, distillation folders, config."""

from __future__ import annotations

import pytest
from helpers import write_shard

from drafters.corpus import CorpusIndex
from drafters.hybrid_config import HybridConfig
from drafters.lookup import LookupDrafter

RECORDS = [[1, 2, 3, 4, 5, 6], [9, 2, 3, 4, 5, 7], [8, 3, 4, 5, 6], [7, 3, 4, 9]]


def test_the_longest_suffix_match_wins_and_continuations_are_counted():
    idx = CorpusIndex.from_records(RECORDS, max_ngram=3, min_ngram=1, max_depth=2)
    conts = idx.continuations([0, 2, 3, 4])          # (2, 3, 4) occurs twice: -> 5 6 and 5 7
    assert [(c.tokens, c.match_len, c.count, c.total) for c in conts] == [([5, 6], 3, 1, 2), ([5, 7], 3, 1, 2)]
    conts = idx.continuations([0, 3, 4])             # (3, 4) occurs four times: 5 6 twice, 5 7, 9 (then a record end)
    assert [(c.tokens, c.count, c.total) for c in conts] == [([5, 6], 2, 4), ([5, 7], 1, 4), ([9], 1, 4)]
    trie = LookupDrafter.trie(conts)
    assert trie.matches == 4 and dict(zip(trie.tokens, trie.votes)) == {5: 3, 6: 2, 7: 1, 9: 1}


def test_no_ngram_or_continuation_crosses_a_record_boundary():
    pairs = CorpusIndex.from_records([[1, 2], [3, 4]], max_ngram=2, min_ngram=2, max_depth=4)
    assert pairs.continuations([2, 3]) == []         # (2, 3) spans the boundary
    assert pairs.continuations([1, 2]) == []         # the record ends: nothing follows
    singles = CorpusIndex.from_records([[1, 2], [3, 4]], max_ngram=1, min_ngram=1, max_depth=4)
    assert [c.tokens for c in singles.continuations([1])] == [[2]]   # stops at the record's end
    assert singles.continuations([4]) == [] and singles.continuations([5]) == []


def test_sampled_occurrences_are_capped_and_matches_limited():
    records = [[1, 2, 10 + i % 7] for i in range(500)]
    idx = CorpusIndex.from_records(records, max_ngram=2, min_ngram=2, max_depth=1, max_matches=3, max_occurrences=70)
    conts = idx.continuations([1, 2])
    assert len(conts) == 3 and all(c.total == 70 for c in conts) and sum(c.count for c in conts) <= 70
    assert conts[0].count >= conts[1].count >= conts[2].count >= 5


def test_distillation_folders_give_their_answers_only(tmp_path):
    for folder, records in (("a", [([1, 2], [3, 4, 5])]), ("b", [([6, 3], [4, 9]), ([7], [8])])):
        (tmp_path / folder).mkdir()
        write_shard(tmp_path / folder / "shard_00000.npz", records)
    idx = CorpusIndex.from_distillations(f"{tmp_path / 'a'},{tmp_path / 'b'}", max_ngram=2, min_ngram=1, max_depth=2)
    assert idx.num_tokens == 3 + 2 + 1 + 3                        # answers and one separator each
    assert [(c.tokens, c.count) for c in idx.continuations([3, 4])] == [([5], 1)]
    assert [c.tokens for c in idx.continuations([4])] == [[5], [9]]
    assert idx.continuations([1, 2]) == []                         # prompts are left out
    with pytest.raises(FileNotFoundError):
        CorpusIndex.from_distillations(tmp_path / "missing")


def test_options_are_validated():
    with pytest.raises(ValueError):
        CorpusIndex.from_records(RECORDS, max_ngram=1, min_ngram=2)
    with pytest.raises(ValueError):
        HybridConfig(corpus_min_ngram=5, corpus_max_ngram=4)
    opts = HybridConfig(corpus_max_ngram=5, corpus_matches=2).corpus_options()
    assert opts["max_ngram"] == 5 and opts["max_matches"] == 2 and opts["min_ngram"] == 2
