"""Runs ``LLMEngine`` in one background thread and exposes per-request async streams."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable

from server.engine.llm_engine import LLMEngine
from server.engine.outputs import RequestOutput, StepStats
from server.engine.request import SamplingParams

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    pass


class RequestFailed(RuntimeError):
    """The engine failed this request alone (the others in its step went on)."""


class EngineBusy(RuntimeError):
    """``max_in_flight`` requests are in flight already."""


class Reservation:
    """``n`` in-flight slots taken by ``AsyncEngine.reserve``; ``release`` (idempotent) gives them back."""

    def __init__(self, engine: AsyncEngine, n: int):
        self.engine, self.n = engine, n

    def release(self) -> None:
        n, self.n = self.n, 0
        if n:
            self.engine._unreserve(n)


class AsyncEngine:
    """Thread-safe front of the engine: ``generate`` yields ``RequestOutput`` deltas."""

    def __init__(self, engine: LLMEngine, on_stats: Callable[[StepStats], None] | None = None,
                 max_in_flight: int = 0):
        self.engine = engine
        self.on_stats = on_stats
        self.max_in_flight = max_in_flight  # requests (choices) reserved at once; 0: no limit
        self.in_flight = 0
        self._count_lock = threading.Lock()
        self._refusal: BaseException | None = None  # set by ``fail_requests``: later requests fail with it
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="treespec-engine", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=30)

    @property
    def healthy(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def reserve(self, n: int) -> Reservation:
        """Count ``n`` requests as in flight until the reservation is released; ``EngineBusy`` if that would
        pass ``max_in_flight`` (a lone reservation is always granted, so a large ``n`` is never refused
        forever)."""
        with self._count_lock:
            if self.max_in_flight and self.in_flight and self.in_flight + n > self.max_in_flight:
                raise EngineBusy(f"{self.in_flight} requests are in flight (limit {self.max_in_flight})")
            self.in_flight += n
        return Reservation(self, n)

    def _unreserve(self, n: int) -> None:
        with self._count_lock:
            self.in_flight -= n

    def fail_requests(self, exc: BaseException) -> None:
        """Fail every request being generated, and every later one, with ``exc`` (each is aborted in the
        engine as its stream ends). Call from the event loop's thread."""
        self._refusal = exc
        for request_id in list(self._streams):
            self._deliver(request_id, exc)

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Submit a request and stream its outputs; aborts it if the consumer goes away."""
        if self._refusal is not None:
            raise self._refusal
        if not self.healthy:
            raise EngineDeadError(f"engine is not running: {self.error!r}")
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), stream)
        self._send(("add", request_id, prompt_token_ids, params))
        finished = False
        try:
            while not finished:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._send(("abort", request_id))

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def _send(self, msg: tuple) -> None:
        self._inbox.put(msg)
        self._wake.set()

    def _deliver(self, request_id: str, item) -> None:
        target = self._streams.get(request_id)
        if target is not None:
            loop, stream = target
            loop.call_soon_threadsafe(stream.put_nowait, item)

    def _drain_inbox(self) -> None:
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if msg[0] == "add":
                _, rid, ids, params = msg
                try:
                    self.engine.add_request(rid, ids, params)
                except Exception as exc:  # noqa: BLE001 - validated by the API already; report, don't die
                    self._deliver(rid, exc)
            elif self.engine.abort(msg[1]) is not None and self.on_stats is not None:
                self.on_stats(self.engine.idle_stats(finished_reasons=["abort"]))

    def _loop(self) -> None:
        while not self._stop:
            self._wake.clear()
            self._drain_inbox()
            if not self.engine.has_unfinished():
                self._wake.wait()
                continue
            try:
                outputs, stats = self.engine.step()
            except Exception as exc:
                log.exception("engine step failed; failing its requests")
                self._fail_all(exc)
                continue
            if self.on_stats is not None:  # metrics first, so a client never sees them lag its response
                self.on_stats(stats)
            for out in outputs:
                self._deliver(out.request_id, RequestFailed(out.error) if out.error else out)

    def _fail_all(self, exc: Exception) -> None:
        sched = self.engine.scheduler
        for req in list(sched.running) + list(sched.waiting):
            self.engine.abort(req.request_id)
            self._deliver(req.request_id, RuntimeError(f"engine error: {exc}"))
