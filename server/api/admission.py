"""Who may start generating: the in-flight limit (429), no one while draining (503); the drain itself."""

from __future__ import annotations

import asyncio
import logging

from server.api.serving import APIError
from server.engine.async_engine import AsyncEngine, EngineBusy, Reservation

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1     # the Retry-After of a 429: a step or two frees slots on a busy server
POLL_S = 0.05         # how often a drain looks at the in-flight count
ABORT_GRACE_S = 5.0   # after aborting, how long a drain waits for the aborted responses to be written


class Admission:
    def __init__(self, engine: AsyncEngine):
        self.engine = engine
        self.draining = False

    def admit(self, n: int) -> Reservation:
        """Reserve ``n`` engine requests (the choices of one HTTP request) or refuse them all."""
        if self.draining:
            raise APIError(503, "the server is shutting down; retry on another instance", "server_error",
                           code="shutting_down")
        try:
            return self.engine.reserve(n)
        except EngineBusy as exc:
            raise APIError(429, f"the server is busy: {exc}; retry after {RETRY_AFTER_S} s",
                           "rate_limit_error", code="too_many_requests",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from exc

    async def drain(self, timeout: float) -> None:
        """Stop admitting, give the requests in flight ``timeout`` seconds to finish, then fail the rest
        (a 503, or an error event on a stream) and wait briefly for those answers to go out."""
        self.draining = True
        log.info("draining: %d requests in flight, up to %g s", self.engine.in_flight, timeout)
        if await self.settled(timeout):
            return
        log.warning("shutdown timeout: aborting %d requests", self.engine.in_flight)
        self.engine.fail_requests(APIError(503, "the server shut down before the request finished",
                                           "server_error", code="shutting_down"))
        await self.settled(ABORT_GRACE_S)

    async def settled(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for nothing to be in flight; whether that happened."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.engine.in_flight and loop.time() < deadline:
            await asyncio.sleep(POLL_S)
        return not self.engine.in_flight
