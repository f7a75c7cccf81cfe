"""Signature checks off the event loop, in arrival order.

Ed25519 verification costs far more than everything else the log service
does per append (about 50-200 us here), and libsodium releases the GIL while
it runs.  So the append path checks the cheap rules on the loop and hands
requests whose items carry plain (one per item) signatures to a few threads,
which verify whatever has queued up and post the outcomes back to the loop,
where they are released in the order the requests came: one publisher's
appends still reach the store in order.

Items signed together (batch signatures, ``shared.signing.sign_batch``) cost
a few hashes each and one Ed25519 check per batch, which is then remembered:
they are checked on the loop, where a thread hand-off would cost more than the
check, and :meth:`Verifier.submit_verified` keeps them behind any request
still being checked here.
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
_Job = tuple[int, str, AppendRequest, Verified]
_Outcome = tuple[int, Verified, ConvlogError | None]


class Verifier:
    """Threads that verify the signatures of submitted appends.

    Args:
        authorize: the rules (its :meth:`~Authorizer.verify_signatures` runs here).
        loop: the event loop outcomes are delivered on.
        threads: verifier threads (libsodium runs in parallel on more cores).
    """

    def __init__(
        self, authorize: Authorizer, loop: asyncio.AbstractEventLoop, *, max_batch: int = 64,
        threads: int = 2,
    ) -> None:
        self._authorize = authorize
        self._loop = loop
        self._max_batch = max_batch
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._seq = 0  # next sequence number handed out (loop thread only)
        self._next = 0  # next sequence number to release (loop thread only)
        self._ready: dict[int, tuple[Verified, ConvlogError | None]] = {}
        self._threads = [
            threading.Thread(target=self._run, name=f"convlog-verify-{i}", daemon=True)
            for i in range(max(1, threads))
        ]
        for t in self._threads:
            t.start()

    def submit(self, sid: str, request: AppendRequest, done: Verified) -> None:
        self._jobs.put((self._seq, sid, request, done))
        self._seq += 1

    @property
    def busy(self) -> bool:
        """Some submitted request is not released yet (on the loop thread)."""
        return self._next != self._seq

    def submit_verified(self, done: Verified) -> None:
        """A request already verified on the loop: released in its turn, after the
        ones submitted before it (at once when there are none)."""
        seq = self._seq
        self._seq += 1
        self._release([(seq, done, None)])

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
            outcomes: list[_Outcome] = []
            for seq, sid, request, done in batch:
                try:
                    self._authorize.verify_signatures(sid, request)
                    outcomes.append((seq, done, None))
                except ConvlogError as e:
                    outcomes.append((seq, done, e))
                except Exception:  # never let the thread die; nothing of it is written
                    log.exception("signature check failed unexpectedly")
                    outcomes.append((seq, done, UnavailableError("internal error; the request was not applied")))
            try:
                self._loop.call_soon_threadsafe(self._release, outcomes)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                return

    def _release(self, outcomes: list[_Outcome]) -> None:
        """On the loop: deliver every outcome whose predecessors are all delivered."""
        for seq, done, err in outcomes:
            self._ready[seq] = (done, err)
        while self._next in self._ready:
            done, err = self._ready.pop(self._next)
            self._next += 1
            try:
                done(err)
            except Exception:
                log.exception("append callback failed after the signature check")

    def close(self) -> None:
        """Finish what was submitted, then stop the threads."""
        for _ in self._threads:
            self._jobs.put(None)
        for t in self._threads:
            t.join(timeout=10)
