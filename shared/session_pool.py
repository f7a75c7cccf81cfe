"""What the ``ConvlogSession`` objects of one process share: connections, copies, appends.

* **Connections.**  Sessions made with ``ConvlogSession.from_url`` and equal
  connection options share one NATS connection per event loop; the last
  session to close releases it.  A process serving hundreds of conversations
  opens one connection, not hundreds.  A loop that ``asyncio.run`` shuts down
  (a thread's own, say) closes its connection as it ends: once it is closed,
  nothing could.
* **Per session id on one connection** (:class:`SharedSession`):

  - one local copy (:class:`~shared.session_copy.SessionCopy`): one consumer
    and one delivery per item for the whole process, however many session
    objects read that id;
  - one append queue.  An ``add_items`` that finds no append of its session
    in flight is sent at once; calls that arrive while one is in flight go
    out together in the next append (a group commit on the client side).
    Each call's items stay contiguous and calls keep the order they were
    made in.  A combined append the log refuses (a bad or oversized item, an
    id conflict, an item the signatures rule forbids; or an item JSON cannot
    encode) is resent call by call, so each call gets its own outcome;
    an unknown outcome (``UnavailableError``) is every call's, and each
    call's retry dedupes on its own item ids;
  - one *floor*: the highest order this connection knows the session has
    (its acknowledged appends, its reads, what its copy holds).  A log read
    behind it is read again (:meth:`SharedSession.read`,
    :meth:`SharedSession.envelopes`): on an R3 JetStream
    stream a replica that trails the leader may answer a read, and a
    log-service instance that did not make the append has nothing to check
    it against, so the read would miss this process's own acknowledged write.
    An order only the copy's deliveries showed is waited for at most
    :data:`DELIVERED_WAIT_S`, once: a chain-valid forged delivery is one the
    log never reaches, and the read then answers what the log holds.
    The floor outlives the session objects: a session id's last object to
    close leaves it with the client for the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Coroutine, Hashable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .agents_sdk import finish, settle
from .client import LogClient
from .errors import BadRequestError, ConflictError, ForbiddenError, TooLargeError, UnavailableError
from .failures import CONFLICT_BACKOFF
from .messages import MAX_APPEND_ITEMS, AppendedItem, Envelope, ReadReply
from .session_copy import SessionCopy

__all__ = [
    "OwnedConnections", "SharedSession", "acquire_connection", "on_loop", "release_connection", "share",
    "unshare",
]

_T = TypeVar("_T")


# -- connections --------------------------------------------------------------


@dataclass
class _Pooled:
    client: LogClient
    users: int = 0
    keeper: asyncio.Task[None] | None = None  # see :func:`_closed_with_loop`


_CONNECTIONS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Hashable, _Pooled]] = (
    weakref.WeakKeyDictionary()
)
_CONNECT_LOCKS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)


async def acquire_connection(key: Hashable, connect: Callable[[], Awaitable[LogClient]]) -> LogClient:
    """The loop's shared client for ``key``, connecting with ``connect()`` if there is none."""
    loop = asyncio.get_running_loop()
    async with _CONNECT_LOCKS.setdefault(loop, asyncio.Lock()):
        pool = _CONNECTIONS.setdefault(loop, {})
        pooled = pool.get(key)
        if pooled is None or pooled.client.nc.is_closed:
            pooled = pool[key] = _Pooled(await connect())
            pooled.keeper = loop.create_task(_closed_with_loop(key, pooled.client),
                                             name="convlog-session-connection")
        pooled.users += 1
        return pooled.client


async def _closed_with_loop(key: Hashable, client: LogClient) -> None:
    """Waits for the life of a pooled connection.  ``asyncio.run`` returning (e.g.
    in a thread of its own) cancels the tasks left on its loop and runs them to
    their end before it closes the loop: this one then closes the connection,
    which nothing can once the loop is closed (:func:`on_loop`), so its socket
    does not stay open in the process and on the server."""
    loop = asyncio.get_running_loop()
    try:
        await loop.create_future()
    finally:
        pool = _CONNECTIONS.get(loop, {})
        pooled = pool.get(key)
        if pooled is not None and pooled.client is client:  # not given back: the loop ends
            del pool[key]
            _SHARED.pop(client, None)  # the copies that followed on it
            if not client.nc.is_closed:
                # Closed, not drained: the connection's own tasks are cancelled by now.
                with contextlib.suppress(Exception):
                    await client.nc.close()


async def release_connection(key: Hashable, client: LogClient) -> None:
    """Give back a client from :func:`acquire_connection`; the last user closes it."""
    pool = _CONNECTIONS.get(asyncio.get_running_loop(), {})
    pooled = pool.get(key)
    if pooled is None or pooled.client is not client:
        await client.close()  # not (or no longer) pooled: it is this caller's alone
        return
    pooled.users -= 1
    if pooled.users <= 0:
        del pool[key]
        await client.close()
        if pooled.keeper is not None:
            pooled.keeper.cancel()
            await asyncio.wait({pooled.keeper})


class OwnedConnections:
    """The connections of one ``ConvlogSession.from_url`` session.

    A NATS connection belongs to the event loop that made it, so an owned
    session uses one per loop: repeated ``Runner.run_sync`` calls and threads
    with their own loops each get theirs.  Within a loop, the sessions with
    equal connection options share one (:func:`acquire_connection`).
    Nothing connects before the first :meth:`get`.
    """

    def __init__(self, url: str, options: dict[str, Any], connect_deadline: float) -> None:
        self.url = url
        self.options = dict(options)
        self.connect_deadline = connect_deadline
        self.key = (url, repr(sorted(self.options.items())))
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LogClient] = (
            weakref.WeakKeyDictionary()
        )
        self._locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
            weakref.WeakKeyDictionary()
        )
        self.closed = False

    async def get(self) -> LogClient:
        """This loop's client, connected on first use.

        Raises:
            RuntimeError: closed (also when closed while connecting).
            UnavailableError: no NATS server answered within ``connect_deadline``.
        """
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is not None and not client.nc.is_closed:
            return client
        async with self._locks.setdefault(loop, asyncio.Lock()):
            client = self._clients.get(loop)
            if client is None or client.nc.is_closed:  # closed under us: its loop's tasks were cancelled
                client = await acquire_connection(self.key, self._connect)
                self._clients[loop] = client
            if self.closed:
                await release_connection(self.key, client)
                raise RuntimeError("ConvlogSession is closed")
            return client

    async def _connect(self) -> LogClient:
        # nats-py keeps retrying a first connect forever when reconnects are
        # unlimited; a session call should fail in bounded time instead.
        opts = {"name": "convlog-session", **self.options}
        try:
            async with asyncio.timeout(self.connect_deadline):
                return await LogClient.connect(self.url, **opts)
        except TimeoutError as e:
            raise UnavailableError(
                f"no NATS server answered at {self.url} within {self.connect_deadline:g} s"
            ) from e

    async def close(self, before: Callable[[], Awaitable[None]] | None = None) -> None:
        """Give every loop's client back to the pool (those of other loops on
        those loops: see :func:`on_loop`), each after ``before()`` ran there
        (the session's wait for its writes in flight on that loop)."""
        self.closed = True
        clients = list(self._clients.items())
        self._clients.clear()
        for loop, client in clients:
            await on_loop(loop, self._release(client, before))

    async def _release(self, client: LogClient, before: Callable[[], Awaitable[None]] | None) -> None:
        if before is not None:
            await before()
        await release_connection(self.key, client)


async def on_loop(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None]) -> None:
    """Run ``coro`` on ``loop``, whose connection it gives back: here when that is this
    loop; on its thread when it is running there (not waited for); and when it is open
    but idle — the thread's default loop that ``Runner.run_sync`` leaves open between
    runs — driven to completion from a worker thread.  A closed loop took its
    connections with it."""
    if loop is asyncio.get_running_loop():
        await coro
    elif loop.is_closed():
        coro.close()
    elif loop.is_running():
        asyncio.run_coroutine_threadsafe(coro, loop)
    else:
        try:
            await asyncio.to_thread(loop.run_until_complete, coro)
        except RuntimeError:  # its thread started (or closed) it meanwhile
            if loop.is_running():
                asyncio.run_coroutine_threadsafe(coro, loop)
            else:
                coro.close()


# -- one session id on one connection -----------------------------------------------


#: How long a log read waits for an order only the copy's deliveries showed (a replica
#: that trails the leader catches up within milliseconds; a chain-valid forgery, never).
DELIVERED_WAIT_S = 0.5


async def at_least(
    floor: int, read: Callable[[], Awaitable[_T]], last: Callable[[_T], int], *, deadline: float, what: str,
    held: int | None = None,
) -> _T:
    """``read()`` until what it answers reaches order ``floor`` (``last`` of the answer).

    A read behind an order this connection knows is stored was answered by a
    replica that trails the stream leader: it catches up within milliseconds.
    ``held``: the part of ``floor`` the log itself showed (acks, reads); past it
    only deliveries did, which the log may never hold, so an answer that reaches
    ``held`` is taken after :data:`DELIVERED_WAIT_S`.

    Raises:
        UnavailableError: still behind after ``deadline`` seconds.
    """
    start = time.monotonic()
    end = start + deadline
    attempt = 0
    while True:
        got = await read()
        k = last(got)
        if k >= floor:
            return got
        wait = CONFLICT_BACKOFF.delay(attempt)
        if held is not None and k >= held and time.monotonic() + wait > start + DELIVERED_WAIT_S:
            return got
        if time.monotonic() + wait > end:
            raise UnavailableError(
                f"the log answered {what} up to order {k}, behind order {floor} this "
                f"connection already has, for {deadline:g} s (a replica trailing the leader)"
            )
        await asyncio.sleep(wait)
        attempt += 1


_COLLECT_STEPS = 8  # loop steps the sender waits for answered writers to call again


@dataclass
class _Call:
    batch: list[dict[str, Any]]
    size: int
    done: asyncio.Future[list[AppendedItem]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class SharedSession:
    """The copy and the append queue of one session id on one client (see the module)."""

    def __init__(self, client: LogClient, session_id: str) -> None:
        self.client = client
        self.loop = asyncio.get_running_loop()  # the loop whose connection ``client`` is
        self.session_id = session_id
        self.users = 0
        self.copy: SessionCopy | None = None
        self._queue: deque[_Call] = deque()
        self._lock = asyncio.Lock()  # one append of this session in flight at a time
        self._sender: asyncio.Task[None] | None = None
        self._in_flight: list[_Call] = []
        self._max_bytes = max(64 * 1024, (client.nc.max_payload or 1024 * 1024) // 2)
        self._floor = 0  # the highest order acks and reads showed (see :attr:`floor`)
        self._unheld = 0  # deliveries up to here were not in the log when a read waited for them

    @property
    def floor(self) -> int:
        """The highest order this connection knows the session has (see the module):
        what its acks and reads showed, and what its copy holds (deliveries too, so a
        copy that paused and seeds again never comes back behind what it showed)."""
        copy = self.copy
        return self._floor if copy is None or copy.last <= self._floor else copy.last

    def saw(self, order: int) -> None:
        """The session is known to hold order ``order`` (an ack, or a read's ``last_order``)."""
        if order > self._floor:
            self._floor = order

    async def read(self, *, deliveries: bool = True, **kw: Any) -> ReadReply:
        """``LogClient.read`` of this session, never behind :attr:`floor` (read again while it is).

        ``deliveries=False``: never behind what the log itself showed this connection (its
        acks and reads), whatever the copy was delivered beyond that: the copy's check for
        what it misses, which a delivery the log never holds (a chain-valid forgery, taken
        until the real item of its order arrives) must not hold up until the deadline."""
        rep = await at_least(
            self._delivered_floor() if deliveries else self._floor,
            lambda: self.client.read(self.session_id, **kw), lambda r: r.last_order,
            deadline=self.client.deadline, what=f"a read of session {self.session_id!r}", held=self._floor,
        )
        if deliveries:
            self._behind_deliveries(rep.last_order)
        self.saw(rep.last_order)
        return rep

    async def envelopes(self, after: int = 0) -> list[Envelope]:
        """Every raw envelope of this session after ``after`` (pages of
        ``LogClient.iter_items``), never behind :attr:`floor` (read again while it is)."""
        async def read() -> list[Envelope]:
            return [e async for e in self.client.iter_items(self.session_id, after=after, raw=True)]

        envs = await at_least(
            self._delivered_floor(), read, lambda got: got[-1].item_order if got else after,
            deadline=self.client.deadline, what=f"session {self.session_id!r}", held=self._floor,
        )
        self._behind_deliveries(envs[-1].item_order if envs else after)
        self.saw(envs[-1].item_order if envs else after)
        return envs

    def _delivered_floor(self) -> int:
        """:attr:`floor`, but not again an order only deliveries showed that a read
        already waited :data:`DELIVERED_WAIT_S` for in vain (one wait per such order)."""
        floor = self.floor
        return floor if floor > self._unheld else self._floor

    def _behind_deliveries(self, order: int) -> None:
        """A log read answered up to ``order``: past it, what the copy was delivered
        is not (yet) the log's."""
        if order < self.floor:
            self._unheld = max(self._unheld, self.floor)

    def get_copy(self) -> SessionCopy:
        """The process's local copy of this session on this client (made on first use)."""
        if self.copy is None:
            self.copy = SessionCopy(self.client, self.session_id, read=self.read)
        return self.copy

    async def append(self, batch: list[dict[str, Any]], size: int) -> list[AppendedItem]:
        """Append one call's items (contiguous, atomic); returns their acks, in order.

        A call that has started finishes even if its caller is cancelled; the
        cancellation is raised once the outcome is known.  The send runs in a
        task of its own (a call sent alone) or in the queue's sender, and the
        caller waits for it without a task per queued call.

        Raises:
            what :meth:`LogClient.append` raises for this call's items.
        """
        idle = self._sender is None or self._sender.done()
        if idle and not self._queue and not self._lock.locked():
            await self._lock.acquire()  # free: taken at once, before anyone else looks
            return await finish(self._send_alone(_Call(batch, size)))
        call = _Call(batch, size)
        self._queue.append(call)
        if idle:
            self._sender = asyncio.create_task(self._drain())
        return await settle(call.done)

    async def _send_alone(self, call: _Call) -> list[AppendedItem]:
        """Nothing in flight: send now, no queueing (the lock is held, and released here)."""
        try:
            return await self._send([call], alone=True)
        finally:
            self._lock.release()

    async def _drain(self) -> None:
        """Send what queued up, batch after batch, while writers keep coming."""
        try:
            while self._queue:
                async with self._lock:
                    self._in_flight = self._take()
                    await self._send(self._in_flight, alone=False)
                    answered, self._in_flight = len(self._in_flight), []
                # The writers just answered usually call again within a few
                # loop steps: wait for them, so the next append carries them
                # all instead of one (sent alone) and the rest behind it.
                for _ in range(_COLLECT_STEPS):
                    if len(self._queue) >= answered:
                        break
                    await asyncio.sleep(0)
        except BaseException as e:  # cancelled with calls still waiting: they must not hang
            err = UnavailableError(f"append on {self.session_id!r} abandoned: {type(e).__name__}")
            for call in [*self._in_flight, *self._queue]:
                if not call.done.done():
                    call.done.set_exception(err)
            self._in_flight = []
            self._queue.clear()
            raise

    def _take(self) -> list[_Call]:
        calls = [self._queue.popleft()]
        n, size = len(calls[0].batch), calls[0].size
        while self._queue:
            nxt = self._queue[0]
            if n + len(nxt.batch) > MAX_APPEND_ITEMS or size + nxt.size > self._max_bytes:
                break
            calls.append(self._queue.popleft())
            n += len(nxt.batch)
            size += nxt.size
        return calls

    async def _send(self, calls: list[_Call], *, alone: bool) -> list[AppendedItem]:
        """Send ``calls`` as one append and settle each; ``alone``: return/raise the one outcome."""
        items = calls[0].batch if len(calls) == 1 else [i for c in calls for i in c.batch]
        try:
            reply = await self.client.append(self.session_id, items)
        except (BadRequestError, TooLargeError, ConflictError, ForbiddenError, TypeError) as e:
            # Refused (TypeError: an item JSON has no form for, found before sending;
            # ForbiddenError: an item the log service requires signed otherwise).
            if len(calls) == 1:
                if alone:
                    raise
                calls[0].done.set_exception(e)
                return []
            for call in calls:  # one of them is refused: give each its own outcome
                await self._send([call], alone=False)
            return []
        except Exception as e:
            if alone:
                raise
            for call in calls:
                call.done.set_exception(e)
            return []
        self.saw(reply.last_order)
        if self.copy is not None:  # read your writes, also after a caller cancelled meanwhile
            self.copy.on_ack(reply.items, [(i["item_id"], i["kind"], i["data"]) for i in items])
        acked = {a.item_id: a for a in reply.items}
        results = [[acked[i["item_id"]] for i in c.batch if i["item_id"] in acked] for c in calls]
        if alone:
            return results[0]
        for call, result in zip(calls, results, strict=True):
            if not call.done.done():
                call.done.set_result(result)
        return []

    async def close(self) -> None:
        if self.copy is not None:
            await self.copy.close()


_SHARED: weakref.WeakKeyDictionary[LogClient, dict[str, SharedSession]] = weakref.WeakKeyDictionary()
#: The floors of sessions whose last session object on a client closed, so a
#: session object made later on that client still reads its predecessors'
#: writes (the most recently closed sessions, per client).
_FLOORS: weakref.WeakKeyDictionary[LogClient, OrderedDict[str, int]] = weakref.WeakKeyDictionary()
_FLOORS_KEPT = 10_000


def share(client: LogClient, session_id: str) -> SharedSession:
    """The shared state of ``session_id`` on ``client``; count one more user."""
    by_sid = _SHARED.setdefault(client, {})
    shared = by_sid.get(session_id)
    if shared is None:
        shared = by_sid[session_id] = SharedSession(client, session_id)
        shared.saw(_FLOORS.get(client, {}).get(session_id, 0))
    shared.users += 1
    return shared


async def unshare(shared: SharedSession) -> None:
    """Count one user less; the last one stops the copy's consumer."""
    shared.users -= 1
    if shared.users > 0:
        return
    by_sid = _SHARED.get(shared.client, {})
    if by_sid.get(shared.session_id) is shared:
        del by_sid[shared.session_id]
    if shared.floor:
        floors = _FLOORS.setdefault(shared.client, OrderedDict())
        floors[shared.session_id] = max(shared.floor, floors.get(shared.session_id, 0))
        floors.move_to_end(shared.session_id)
        if len(floors) > _FLOORS_KEPT:
            floors.popitem(last=False)
    await shared.close()
