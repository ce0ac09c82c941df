"""The hybrid drafter's options (torch-free, so the server config can embed them)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class HybridConfig(BaseModel):
    """Options of the hybrid drafter (the model drafter keeps its own)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lookup_prior: float = Field(0.7, gt=0, lt=1, description="Prior per-token acceptance of lookup tokens")
    prior_weight: float = Field(4.0, gt=0, description="Observed lookup tokens the prior is worth")
    decay: float = Field(0.95, gt=0, le=1, description="Per-step decay of the observed counts (1: never forget)")
    max_lookup_depth: int = Field(8, ge=1, le=64, description="Most tokens per lookup continuation")
    max_ngram: int = Field(3, ge=1, description="Longest suffix n-gram matched")
    min_ngram: int = Field(1, ge=1, description="Shortest suffix n-gram matched")
    max_matches: int = Field(4, ge=1, description="Most continuations (most recent matches first)")
    corpus: str = Field("auto", description="Corpus lookup: 'auto' (the served model's shipped "
                        "self-distillation answers, when it has them), 'none', or distillation folders, "
                        "comma-joined")
    corpus_prior: float = Field(0.7, gt=0, lt=1, description="Prior per-token acceptance of corpus tokens")
    corpus_max_ngram: int = Field(4, ge=1, le=16, description="Longest suffix n-gram looked up in the corpus")
    corpus_min_ngram: int = Field(2, ge=1, le=16, description="Shortest suffix n-gram looked up in the corpus")
    corpus_max_depth: int = Field(6, ge=1, le=64, description="Most tokens per corpus continuation")
    corpus_matches: int = Field(4, ge=1, description="Most distinct corpus continuations (most frequent first)")
    corpus_occurrences: int = Field(64, ge=1, description="Corpus occurrences of the n-gram counted at most")

    @model_validator(mode="after")
    def _ngram_range(self) -> HybridConfig:
        if self.min_ngram > self.max_ngram:
            raise ValueError(f"min_ngram ({self.min_ngram}) must not exceed max_ngram ({self.max_ngram})")
        if self.corpus_min_ngram > self.corpus_max_ngram:
            raise ValueError(f"corpus_min_ngram ({self.corpus_min_ngram}) must not exceed corpus_max_ngram "
                             f"({self.corpus_max_ngram})")
        return self

    def corpus_options(self) -> dict[str, int]:
        """Keyword arguments of :class:`drafters.corpus.CorpusIndex`."""
        return {"max_ngram": self.corpus_max_ngram, "min_ngram": self.corpus_min_ngram,
                "max_depth": self.corpus_max_depth, "max_matches": self.corpus_matches,
                "max_occurrences": self.corpus_occurrences}
