"""The ``live`` fixture: in-process servers over the tiny model (see ``tests/live_app.py``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from live_app import Live, start_live

from server.config import API_KEYS_ENV


@pytest.fixture
def live(tiny_pair, monkeypatch) -> Iterator[Callable[..., Live]]:
    """``live(num_blocks=.., max_num_seqs=.., **ServerConfig fields)`` starts a server; all stop at the
    end of the test."""
    monkeypatch.delenv(API_KEYS_ENV, raising=False)
    started: list[Live] = []

    def start(**kwargs) -> Live:
        started.append(start_live(tiny_pair[1], **kwargs))
        return started[-1]

    yield start
    for s in started:
        s.stop()
