"""SWIFT's skip sets: which attention / MLP sub-layers a drafting forward skips, and their 0/1
vector encoding (the layer-set search's space, ``drafters/swift_search.py``), torch-free."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["SkipSet", "num_coordinates"]


def num_coordinates(num_layers: int) -> int:
    """Size of the search space: one attention and one MLP sub-layer per layer 1..L-2."""
    return 2 * (num_layers - 2)


@dataclass(frozen=True)
class SkipSet:
    """The sub-layers a drafting forward skips.

    ``attn`` / ``mlp`` are the sorted indices of the layers whose attention / MLP sub-layer is
    skipped (the residual stream passes through unchanged). Only layers ``1..num_layers-2`` may
    be skipped: the first and the last layer always run.

    As a vector (the search space) a set is ``2*(L-2)`` binaries: attention of layers 1..L-2
    first, then MLP of layers 1..L-2 — coordinate ``c`` is attention of layer ``c+1`` for
    ``c < L-2`` and MLP of layer ``c-(L-2)+1`` otherwise, as in the reference.
    """

    num_layers: int
    attn: tuple[int, ...] = ()
    mlp: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.num_layers < 3:
            raise ValueError(f"num_layers must be >= 3 to skip anything, got {self.num_layers}")
        for name in ("attn", "mlp"):
            layers = tuple(sorted(int(i) for i in getattr(self, name)))
            if len(set(layers)) != len(layers):
                raise ValueError(f"{name} lists a layer twice: {layers}")
            bad = [i for i in layers if not 1 <= i <= self.num_layers - 2]
            if bad:
                raise ValueError(f"{name} layers {bad} cannot be skipped: only layers 1.."
                                 f"{self.num_layers - 2} of {self.num_layers} may be")
            object.__setattr__(self, name, layers)

    # ---- constructors

    @classmethod
    def from_indices(cls, num_layers: int, coords: Iterable[int]) -> SkipSet:
        """The set whose skipped coordinates (vector positions) are ``coords``."""
        half = num_layers - 2
        coords = [int(c) for c in coords]
        bad = [c for c in coords if not 0 <= c < 2 * half]
        if bad:
            raise ValueError(f"coordinates {bad} out of range 0..{2 * half - 1}")
        return cls(num_layers,
                   attn=tuple(c + 1 for c in coords if c < half),
                   mlp=tuple(c - half + 1 for c in coords if c >= half))

    @classmethod
    def from_vector(cls, num_layers: int, bits: Sequence[int]) -> SkipSet:
        """Inverse of :meth:`vector`: ``bits`` holds ``2*(L-2)`` zeros and ones."""
        if len(bits) != num_coordinates(num_layers):
            raise ValueError(f"expected {num_coordinates(num_layers)} bits for {num_layers} layers, "
                             f"got {len(bits)}")
        if any(b not in (0, 1) for b in bits):
            raise ValueError(f"bits must be 0 or 1: {list(bits)}")
        return cls.from_indices(num_layers, (c for c, b in enumerate(bits) if b))

    @classmethod
    def from_top(cls, num_layers: int, scores: Sequence[float], num_skip: int) -> SkipSet:
        """The ``num_skip`` coordinates with the highest ``scores`` skipped (ties: lower coordinate
        first) — how the reference turns a continuous BO suggestion into a skip set."""
        scores = np.asarray(scores, dtype=float)
        if scores.shape != (num_coordinates(num_layers),):
            raise ValueError(f"expected {num_coordinates(num_layers)} scores, got shape {scores.shape}")
        if not 0 <= num_skip <= scores.size:
            raise ValueError(f"num_skip must be in 0..{scores.size}, got {num_skip}")
        return cls.from_indices(num_layers, np.argsort(-scores, kind="stable")[:num_skip])

    @classmethod
    def initial(cls, num_layers: int) -> SkipSet:
        """The reference's starting set: odd layers 1, 3, ... (up to L-2) for attention and MLP."""
        odd = tuple(range(1, num_layers - 1, 2))
        return cls(num_layers, attn=odd, mlp=odd)

    @classmethod
    def random(cls, num_layers: int, num_skip: int, rng: np.random.Generator) -> SkipSet:
        """``num_skip`` coordinates drawn uniformly without replacement (the reference's random
        search, ``np.random.choice(2(L-2), num_skip, replace=False)``, on ``rng``)."""
        return cls.from_indices(num_layers, rng.choice(num_coordinates(num_layers), num_skip,
                                                       replace=False))

    # ---- views

    def vector(self) -> list[int]:
        """The ``2*(L-2)`` binaries: attention of layers 1..L-2, then MLP of layers 1..L-2."""
        layers = range(1, self.num_layers - 1)
        attn, mlp = set(self.attn), set(self.mlp)
        return [int(i in attn) for i in layers] + [int(i in mlp) for i in layers]

    @property
    def num_skipped(self) -> int:
        """Skipped sub-layers, attention and MLP together."""
        return len(self.attn) + len(self.mlp)

    @property
    def ratio(self) -> float:
        """Skipped share of the skippable sub-layers, ``num_skipped / (2*(L-2))``."""
        return self.num_skipped / num_coordinates(self.num_layers)

    def to_json(self) -> dict[str, Any]:
        """``{"num_layers": L, "attn": [...], "mlp": [...]}``."""
        return {"num_layers": self.num_layers, "attn": list(self.attn), "mlp": list(self.mlp)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SkipSet:
        """Inverse of :meth:`to_json` (validated)."""
        return cls(int(data["num_layers"]), attn=tuple(data["attn"]), mlp=tuple(data["mlp"]))
