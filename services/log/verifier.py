"""Signature checks off the event loop, in arrival order.

Ed25519 verification costs far more than everything else the log service
does per append (about 50-200 us here), and libsodium releases the GIL while
it runs.  So the append path checks the cheap rules on the loop and hands
signed requests to one thread, which verifies whatever has queued up and
posts the outcomes back to the loop in the order they came: one publisher's
appends still reach the store in order.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable

from shared.errors import ConvlogError, UnavailableError
from shared.messages import AppendRequest

from .authorize import Authorizer

__all__ = ["Verifier"]

log = logging.getLogger("convlog.log.verifier")

#: Called on the event loop with ``None`` (the signatures hold) or the error to reply.
Verified = Callable[[ConvlogError | None], None]
_Job = tuple[str, AppendRequest, Verified]


class Verifier:
    """One thread that verifies the signatures of submitted appends.

    Args:
        authorize: the rules (its :meth:`~Authorizer.verify_signatures` runs here).
        loop: the event loop outcomes are delivered on.
    """

    def __init__(self, authorize: Authorizer, loop: asyncio.AbstractEventLoop, *, max_batch: int = 512) -> None:
        self._authorize = authorize
        self._loop = loop
        self._max_batch = max_batch
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="convlog-verify", daemon=True)
        self._thread.start()

    def submit(self, sid: str, request: AppendRequest, done: Verified) -> None:
        self._jobs.put((sid, request, done))

    def _run(self) -> None:
        while True:
            first = self._jobs.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self._max_batch:
                try:
                    nxt = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._jobs.put(None)  # stop after this batch
                    break
                batch.append(nxt)
            outcomes: list[tuple[Verified, ConvlogError | None]] = []
            for sid, request, done in batch:
                try:
                    self._authorize.verify_signatures(sid, request)
                    outcomes.append((done, None))
                except ConvlogError as e:
                    outcomes.append((done, e))
                except Exception:  # never let the thread die; nothing of it is written
                    log.exception("signature check failed unexpectedly")
                    outcomes.append((done, UnavailableError("internal error; the request was not applied")))
            try:
                self._loop.call_soon_threadsafe(_deliver, outcomes)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                return

    def close(self) -> None:
        """Finish what was submitted, then stop the thread."""
        self._jobs.put(None)
        self._thread.join(timeout=10)


def _deliver(outcomes: list[tuple[Verified, ConvlogError | None]]) -> None:
    for done, err in outcomes:
        try:
            done(err)
        except Exception:
            log.exception("append callback failed after the signature check")
