"""A drop-in ``Session`` for the OpenAI Agents SDK, backed by the convlog log.

``ConvlogSession`` implements the SDK's ``Session`` protocol structurally
(``session_id``, ``session_settings``, ``get_items``, ``add_items``,
``pop_item``, ``clear_session``) on top of :class:`~shared.client.LogClient`,
so every process and machine that uses one session id sees one ordered,
durable, auditable history::

    from agents import Runner, SessionSettings
    from shared import ConvlogSession

    session = ConvlogSession.from_url(
        "ticket-2026-0314-001", url="nats://127.0.0.1:4222",
        session_settings=SessionSettings(limit=50),
    )
    result = await Runner.run(triage, "I was charged twice", session=session,
                              hooks=session.hooks())

Nothing from ``agents`` is imported when this module is imported; the SDK is
needed only where its types are (the default ``SessionSettings`` and
:meth:`ConvlogSession.hooks`), and a missing SDK then raises an
``ImportError`` that names ``pip install 'convlog[agents]'``.

How the methods map onto the log (history is hidden, never destroyed):

* ``get_items(limit)`` is the last ``limit`` *visible* items, oldest first;
  ``limit=None`` uses ``session_settings.limit``, and when that is ``None``
  too, the whole visible history.
* ``add_items(items)`` is **one** atomic append: the items get contiguous
  ``item_order``s, or none is written.
* ``pop_item()`` appends a ``retract`` of the newest visible item and returns
  that item; ``clear_session()`` appends a ``clear``.  Audit replay
  (``LogClient.items(sid, raw=True)``, ``convlog replay``) still shows both
  the hidden items and the retract/clear that hid them.

Reads are local (``follow=True``, the default): the process keeps a copy of
the session's newest visible items (:mod:`shared.session_copy`), fed by its
own acknowledged appends and by a JetStream consumer on
``<prefix>.items.<sid>``, so ``get_items`` answers without a round trip while
the copy is current.  What a read returns:

* always the visible history of one prefix ``1..k`` of the log, ``k`` never
  decreasing within the process: no gap, nothing reordered, never a hide
  without the items before it;
* this process's writes: after ``add_items``/``pop_item``/``clear_session``
  returns, every read includes it (read your writes);
* another process's acknowledged write: once its envelope is delivered (the
  follow delay, about a millisecond on a local server), and in any case
  within ``max_staleness`` seconds (default 1.0): a copy not confirmed
  against the log for that long reads its position from the log first.
  When the copy knows it is behind — an ack or delivery past a gap, a
  reconnect, a consumer gone silent or deleted — it reads what it misses
  from the log before answering.

The copy holds up to 2,000 visible items (16 MiB); a read that needs older
ones goes to the log.  A copy nobody reads stops following after 200 unread
envelopes or 60 s without a read, and seeds again at the next read.  Where
the consumer cannot be created (no permission on the items stream, JetStream
unavailable) every read goes to the log, as with ``follow=False``; the copy
tries again after 10 s, then less often (up to every 5 minutes).

Concurrency (the SDK's ``add_items`` carries no version, so this is the
contract): any number of processes may call these methods on one session id
at once.  The log service orders appends, so readers see one contiguous
history; nothing acknowledged is lost; the items of one ``add_items`` call are
adjacent (nothing from another writer lands between them); two concurrent
calls land in the order the log service received them.  ``pop_item`` is
conditional on the session's last order (``expected_last``) and retries on a
conflict, so two concurrent pops hide two different items and each returns the
item it hid.  Within one process, session objects share what they can
(:mod:`shared.session_pool`): ``from_url`` sessions with equal options one
NATS connection per event loop, sessions on one id one copy, and concurrent
``add_items`` calls on one id one append in flight — calls that arrive
meanwhile go out together in the next, each call's items still contiguous
and atomic, a refused call failing alone.

Idempotency (:mod:`shared.call_keys`): the items of one ``add_items`` call
get ids ``"<call key>.<i>"``; a call that ended without a known outcome
(``UnavailableError``) and is made again with equal items reuses its key, so
the log answers what it already holds as duplicates.  A mutation that has
started runs to completion even if the caller is cancelled; the cancellation
is re-raised afterwards.

Turns: an SDK app runs its own agent, so by default the items a session
adds start no convlog turn: their ids are ``"noturn:<call key>.<i>"``
(:data:`shared.work.NO_TURN_PREFIX`), and the log service announces them to
no worker, so no convlog agent answers a message the app answers itself, and
the log service spends no turn notice on them.  ``start_turns=True`` writes
plain ids, and then a convlog worker answers each user message as it does
one sent to ``convlog.in``.  The items a compaction puts back
(``_atomic_replace_items``) never start a turn: they were answered before.

Authors (:mod:`shared.session_authors`): user items are written as
``"user"``, system/developer messages as ``"system"``, everything else as the
agent the run's hooks (``hooks=session.hooks()``) say is running, else the
``agent`` given to the constructor (default ``"assistant"``).
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .agents_sdk import INSTALL_HINT, require_agents_sdk, tracked
from .agents_sdk import coerce_settings as _coerce_settings
from .agents_sdk import plain as _plain
from .call_keys import CallKeys
from .client import LogClient
from .errors import TooLargeError, UnavailableError
from .history import visible
from .session_authors import AuthorTracking
from .session_copy import SessionCopy
from .session_edits import HidingEdits
from .session_pool import OwnedConnections, SharedSession, on_loop, share, unshare
from .subjects import validate_session_id
from .work import NO_TURN_PREFIX

if TYPE_CHECKING:  # pragma: no cover - types only
    from agents.memory import SessionSettings

__all__ = ["INSTALL_HINT", "ConvlogSession", "require_agents_sdk"]

log = logging.getLogger("convlog.agents_session")

DEFAULT_AGENT = "assistant"
_TAIL_MAX = 100_000  # the largest ``tail`` a read request may ask for


class ConvlogSession(HidingEdits, AuthorTracking):
    """The OpenAI Agents SDK ``Session`` protocol on a convlog session.

    Args:
        session_id: the convlog session id (``[A-Za-z0-9_-]{1,128}``).
        client: a connected :class:`LogClient`; not closed by :meth:`close`.
            Use :meth:`from_url` to let the session own its connection.
        session_settings: ``SessionSettings`` or a dict such as ``{"limit": 50}``;
            ``None`` means ``SessionSettings()`` (no limit).  ``limit`` is the
            default for :meth:`get_items`, hence the history the Runner sends
            to the model.
        agent: the author recorded for non-user items when no hook has told
            the session which agent is running (default ``"assistant"``).
        follow: keep a local copy of the session, followed live, so reads
            need no round trip (default); ``False`` reads the log every time.
        max_staleness: with ``follow``, the longest time (s) a read may rely
            on live deliveries alone before the copy confirms its position
            with the log service (default 1.0).
        start_turns: let convlog workers answer the user messages this
            session adds (default ``False``: the SDK app runs its own agent
            and answers them; see "Turns" in the module docstring).

    Raises:
        InvalidSessionIdError: a session id convlog cannot address.
        ImportError: the Agents SDK is missing (names ``pip install 'convlog[agents]'``).
    """

    session_id: str
    session_settings: SessionSettings | None = None

    def __init__(
        self,
        session_id: str,
        *,
        client: LogClient | None = None,
        session_settings: SessionSettings | Mapping[str, Any] | None = None,
        agent: str | None = None,
        follow: bool = True,
        max_staleness: float = 1.0,
        start_turns: bool = False,
    ) -> None:
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0 seconds, not {max_staleness!r}")
        self.session_id = validate_session_id(session_id)
        self.follow = follow
        self.max_staleness = max_staleness
        self.start_turns = start_turns
        self._id_prefix = "" if start_turns else NO_TURN_PREFIX
        self.session_settings = _coerce_settings(session_settings)
        AuthorTracking.__init__(self, agent or DEFAULT_AGENT)
        self._client = client
        self._owned: OwnedConnections | None = None  # from_url: one connection per event loop
        self._shared: weakref.WeakKeyDictionary[LogClient, SharedSession] = weakref.WeakKeyDictionary()
        self._closed = False  # no new calls
        self._released = False  # the connection and the copy given back (close() done)
        self._keys = CallKeys()
        self._busy: set[asyncio.Future[None]] = set()  # mutations in flight (close waits for them)

    @classmethod
    def from_url(
        cls,
        session_id: str,
        *,
        url: str,
        session_settings: SessionSettings | Mapping[str, Any] | None = None,
        agent: str | None = None,
        follow: bool = True,
        max_staleness: float = 1.0,
        start_turns: bool = False,
        connect_deadline: float = 10.0,
        **client_opts: Any,
    ) -> ConvlogSession:
        """A session that owns its NATS connection, like the SDK's ``RedisSession.from_url``.

        Nothing connects here: the connection is made on first use, in the
        event loop that uses it; a call from another event loop (repeated
        ``Runner.run_sync`` calls, threads with their own loops) gets a
        connection of its own.  :meth:`close` drains them.

        Args:
            session_id: the convlog session id.
            url: NATS URL(s), comma-separated.
            session_settings: see the class.
            agent, follow, max_staleness, start_turns: see the class.
            connect_deadline: seconds a first connection may take before a
                call fails with ``UnavailableError``.
            **client_opts: forwarded to :meth:`LogClient.connect` (``settings``
                for prefix, credentials and timeouts; ``name``; nats options).
        """
        session = cls(session_id, session_settings=session_settings, agent=agent, follow=follow,
                      max_staleness=max_staleness, start_turns=start_turns)
        session._owned = OwnedConnections(url, client_opts, connect_deadline)
        return session

    # -- connection ------------------------------------------------------
    async def _log(self) -> LogClient:
        if self._closed:
            raise RuntimeError("ConvlogSession is closed")
        if self._owned is None:
            if self._client is None:
                raise RuntimeError(
                    "ConvlogSession needs client=LogClient or ConvlogSession.from_url()"
                )
            return self._client
        client = await self._owned.get()
        self._client = client
        return client

    @property
    def client(self) -> LogClient | None:
        """The :class:`LogClient` in use (``None`` before a ``from_url`` session connects)."""
        return self._client

    def copy_info(self) -> dict[str, Any] | None:
        """How this process's local copy of the session stands: ``following``,
        ``last`` (the order it has applied everything up to), ``items`` held,
        ``log_reads`` (round trips made to bring it up to date), ``pauses``,
        ``consumer``.  ``None`` before the first read or with ``follow=False``."""
        state = self._shared.get(self._client) if self._client is not None else None
        return state.copy.info() if state is not None and state.copy is not None else None

    async def ping(self) -> bool:
        """True when the log service answers for this session.

        Raises:
            RuntimeError: the session is closed.
        """
        client = await self._log()
        try:
            await client.last_order(self.session_id)
        except Exception:
            return False
        return True

    async def close(self) -> None:
        """Close the session; idempotent.

        An owned connection is drained (those made in other loops are drained
        on those loops, also the idle loop ``Runner.run_sync`` leaves open); an
        injected client is left open for its owner.  A mutation already started
        (on any loop) runs to its outcome before its loop's connection goes.
        """
        if self._released:
            return
        self._closed = True
        await self._writes_done()  # (close() cancelled here: the next call releases)
        if self._released:  # another close() released meanwhile
            return
        self._released = True
        shared = list(self._shared.values())
        self._shared.clear()
        for state in shared:
            await on_loop(state.loop, self._unshare(state))
        if self._owned is not None:
            self._client = None
            await self._owned.close(before=self._writes_done)

    async def _writes_done(self) -> None:
        """Wait until the mutations this session started on the running loop have
        their outcome: one runs to it before its loop's connection or copy goes
        (also when ``close()`` runs on another loop, e.g. beside ``Runner.run_sync``
        in a thread; the copy and connection of that loop are given back there)."""
        here = asyncio.get_running_loop()
        started = [f for f in list(self._busy) if f.get_loop() is here]
        if started:
            await asyncio.wait(started)

    async def _unshare(self, state: SharedSession) -> None:
        await self._writes_done()
        await unshare(state)

    async def __aenter__(self) -> ConvlogSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- what the process shares -------------------------------------------------
    def _state(self, client: LogClient) -> SharedSession:
        """The copy and append queue of this session id on ``client`` (shared in the process)."""
        state = self._shared.get(client)
        if state is None:
            if self._released:  # a call in flight when close() gave the state back: not again
                raise RuntimeError("ConvlogSession is closed")
            state = self._shared[client] = share(client, self.session_id)
        return state

    async def _current_copy(self, client: LogClient, want: int | None) -> SessionCopy | None:
        """The process's copy of the session, brought up to date; ``None``: read the log."""
        if not self.follow:
            return None
        state = self._state(client)
        copy = state.get_copy()
        if not await copy.current(want, self.max_staleness):
            return None
        if copy.last < state.floor:  # another session object of this connection read further
            await copy.fill()
        return copy

    def _acked(self, client: LogClient, acks: list[Any], batch: list[dict[str, Any]]) -> None:
        """Tell the copy what an append of this process wrote (read your writes)."""
        if self._released and client not in self._shared:
            return  # closed meanwhile: no copy of this session's to tell
        state = self._state(client)
        state.saw(max((a.item_order for a in acks), default=0))
        copy = state.copy
        if copy is not None:
            copy.on_ack(acks, [(b["item_id"], b["kind"], b["data"]) for b in batch])

    # -- Session protocol ------------------------------------------------
    async def get_items(
        self, limit: int | None = None, *, wrapper: Any = None
    ) -> list[dict[str, Any]]:
        """The last ``limit`` visible items in chronological order.

        Served from the session's local copy when it holds them (see the
        module docstring for what that copy guarantees), else from the log.

        Args:
            limit: how many; ``None`` uses ``session_settings.limit`` and, if
                that is ``None`` too, returns the whole visible history.
                ``0`` gives ``[]``; a negative limit means no limit (as SQLite's
                ``LIMIT -1`` does for the SDK's ``SQLiteSession``).
            wrapper: the run's ``RunContextWrapper`` (passed by the Runner; unused here).

        Returns:
            The stored item dicts, exactly as they were added (fresh objects:
            changing them changes nothing stored).
        """
        client = await self._log()
        n = limit
        if n is None and self.session_settings is not None:
            n = self.session_settings.limit
        if n is not None and n < 0:
            n = None
        if n == 0:
            return []
        copy = await self._current_copy(client, n)
        if copy is not None:
            got = copy.items(n)
            if got is not None:
                return got
        items, k = await self._read_log(client, n)
        if copy is not None and copy.last < k:
            await copy.fill()  # the log answered past the copy: later reads must not go back
        return items

    async def _log_read(self, client: LogClient, **kw: Any) -> Any:
        """One read of the session from the log, never behind what this connection has."""
        return await self._state(client).read(**kw)

    async def _read_log(self, client: LogClient, n: int | None) -> tuple[list[dict[str, Any]], int]:
        """The last ``n`` visible items from the log, and the ``k`` of the prefix they show."""
        if n is not None and n <= _TAIL_MAX:
            try:
                rep = await self._log_read(client, tail=n)
                return [env.data for env in rep.items], rep.last_order
            except TooLargeError:
                pass  # the tail does not fit one reply: page forward instead
        # Page the raw envelopes (they never change, so the pages are one prefix
        # 1..k of the log) and fold them here: visible pages read at different
        # times would mix histories when a retract or clear lands in between.
        # For the last n, only from a little before them (an item after ``start``
        # is hidden only by a retract or clear after it), further back while short.
        state = self._state(client)
        span = None if n is None else 2 * n
        last = 0 if n is None else (await state.read(tail=0)).last_order
        while True:
            start = 0 if span is None else max(0, last - span)
            raw = await state.envelopes(after=start)
            shown = visible(raw)
            if n is None or len(shown) >= n or start == 0 or any(e.kind == "clear" for e in raw):
                k = raw[-1].item_order if raw else start
                return [env.data for env in (shown if n is None else shown[-n:])], k
            span *= 4  # type: ignore[operator]

    @tracked
    async def add_items(self, items: list[Any], *, wrapper: Any = None) -> None:
        """Append ``items`` as one atomic, idempotent append (see the module docstring).

        When this returns, :meth:`get_items` in this process includes them.

        Args:
            items: Responses input items (dicts), oldest first.
            wrapper: the run's ``RunContextWrapper``; picks the author set by :meth:`hooks`.

        Raises:
            BadRequestError, TooLargeError: refused; nothing was written.
            UnavailableError: no answer in time; calling again with equal items is safe.
        """
        client = await self._log()
        if not items:
            return
        self._unknown_pop = None  # a pop after this one is a new pop, not a retry
        data = [_plain(i) for i in items]
        call = self._keys.begin(data)
        if call.authors is None:  # a retry keeps the authors its key was first sent with
            agent = self._agent_for(wrapper)
            call.authors = [self._author(d, agent) for d in data]
        prefix = self._id_prefix
        batch = [
            {"item_id": f"{prefix}{call.key}.{i}", "agent": a, "kind": "item", "data": d}
            for i, (d, a) in enumerate(zip(data, call.authors, strict=True))
        ]
        try:
            # Finishes despite a cancel, and the copy gets the acks then (read your writes).
            await self._state(client).append(batch, call.size)
        except UnavailableError:
            self._keys.unknown(call)  # outcome unknown: a retry of this batch reuses the key
            raise
        except asyncio.CancelledError as e:  # finish/settle chain the append's own failure
            if isinstance(e.__cause__, UnavailableError):
                self._keys.unknown(call)
            else:
                self._keys.settled(call)
            raise
        except BaseException:
            self._keys.settled(call)
            raise
        self._keys.settled(call)

    def _items_are_plain(self) -> bool:
        """True unless a subclass overrides how items are read or written."""
        cls = type(self)
        return cls.add_items is ConvlogSession.add_items and cls.get_items is ConvlogSession.get_items

    def __repr__(self) -> str:
        limit = getattr(self.session_settings, "limit", None)
        return f"ConvlogSession({self.session_id!r}, limit={limit}, agent={self.default_agent!r})"
