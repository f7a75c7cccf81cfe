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

Idempotency: each ``add_items`` call mints one random *call key* and gives
item ``i`` the ``item_id`` ``"<call key>.<i>"``.  Transport retries inside
:class:`LogClient` resend the same ids, so a reply lost on the way back never
doubles anything.  If a call still ends without a known outcome
(``UnavailableError``), the key stays pending for that exact batch: calling
``add_items`` again with equal items reuses it, and the log answers the items
it already holds as duplicates instead of writing them twice (up to 64
such batches are remembered per session object; a retry from another
process cannot be recognised, its keys are its own).  Once an
outcome is known the key is dropped, so adding equal content later (say the
SDK re-adding an item it popped while rewinding a turn, SDK issue #3852) is a
new write and becomes visible again.  A mutation that has started runs to
completion even if the caller is cancelled; the cancellation is re-raised
afterwards.

Authors: every envelope records an ``agent``.  Items with ``role`` ``user``
are written as ``"user"``; ``system``/``developer`` messages as
``"system"``; everything else as the *current agent*.  The SDK's session calls
carry no agent (the ``wrapper`` keyword passes the run's
``RunContextWrapper``, which holds the user's context and usage, not the
agent), so the current agent comes from :meth:`ConvlogSession.hooks`: pass
``hooks=session.hooks()`` to ``Runner.run`` and the session learns each agent
as it starts, per run (runs are told apart by the ``wrapper`` the Runner
passes).  Without hooks the author is the ``agent`` given to the
constructor (default ``"assistant"``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import weakref
from collections import OrderedDict, deque
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .agents_sdk import INSTALL_HINT, require_agents_sdk
from .agents_sdk import canonical as _canonical
from .agents_sdk import coerce_settings as _coerce_settings
from .agents_sdk import finish as _finish
from .agents_sdk import hooks_class as _hooks_class
from .agents_sdk import plain as _plain
from .agents_sdk import run_key as _run_key
from .client import LogClient, new_item_id
from .errors import ConflictError, TooLargeError, UnavailableError
from .failures import CONFLICT_BACKOFF
from .session_copy import SessionCopy
from .session_pool import SharedSession, acquire_connection, release_connection, share, unshare
from .subjects import validate_session_id

if TYPE_CHECKING:  # pragma: no cover - types only
    from agents import RunHooks
    from agents.memory import SessionSettings

__all__ = ["INSTALL_HINT", "ConvlogSession", "require_agents_sdk"]

log = logging.getLogger("convlog.agents_session")

DEFAULT_AGENT = "assistant"
_TAIL_MAX = 100_000  # the largest ``tail`` a read request may ask for
_MAX_PENDING_KEYS = 64
_POP_ATTEMPTS = 50


class ConvlogSession:
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
    ) -> None:
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0 seconds, not {max_staleness!r}")
        self.session_id = validate_session_id(session_id)
        self.follow = follow
        self.max_staleness = max_staleness
        self.session_settings = _coerce_settings(session_settings)
        self.default_agent = agent or DEFAULT_AGENT
        self._client = client
        self._url: str | None = None
        self._client_opts: dict[str, Any] = {}
        self._owns_client = False
        self._connect_deadline = 10.0
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LogClient] = (
            weakref.WeakKeyDictionary()
        )
        self._connect_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
            weakref.WeakKeyDictionary()
        )
        self._shared: weakref.WeakKeyDictionary[LogClient, SharedSession] = weakref.WeakKeyDictionary()
        self._closed = False
        self._pending: OrderedDict[str, str] = OrderedDict()
        self._current_agent: str | None = None
        self._run_agents: dict[int, str] = {}
        self._hooks: Any = None

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
            agent, follow, max_staleness: see the class.
            connect_deadline: seconds a first connection may take before a
                call fails with ``UnavailableError``.
            **client_opts: forwarded to :meth:`LogClient.connect` (``settings``
                for prefix, credentials and timeouts; ``name``; nats options).
        """
        session = cls(session_id, session_settings=session_settings, agent=agent, follow=follow,
                      max_staleness=max_staleness)
        session._url = url
        session._client_opts = dict(client_opts)
        session._connect_deadline = connect_deadline
        session._owns_client = True
        return session

    # -- connection ------------------------------------------------------
    async def _log(self) -> LogClient:
        if self._closed:
            raise RuntimeError("ConvlogSession is closed")
        if not self._owns_client:
            if self._client is None:
                raise RuntimeError(
                    "ConvlogSession needs client=LogClient or ConvlogSession.from_url()"
                )
            return self._client
        # A NATS connection belongs to the event loop that made it, so an owned
        # session uses one per loop: repeated ``Runner.run_sync`` calls and
        # threads with their own loops each get theirs.  Within a loop, the
        # sessions with equal connection options share one (session_pool).
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is not None:
            return client
        lock = self._connect_locks.setdefault(loop, asyncio.Lock())
        async with lock:
            client = self._clients.get(loop)
            if client is None:
                client = await acquire_connection(self._pool_key, self._connect)
                self._clients[loop] = client
                self._client = client
            if self._closed:
                await release_connection(self._pool_key, client)
                raise RuntimeError("ConvlogSession is closed")
            return client

    @property
    def _pool_key(self) -> tuple[str | None, str]:
        return self._url, repr(sorted(self._client_opts.items()))

    async def _connect(self) -> LogClient:
        # nats-py keeps retrying a first connect forever when reconnects are
        # unlimited; a session call should fail in bounded time instead.
        opts = {"name": "convlog-session", **self._client_opts}
        try:
            async with asyncio.timeout(self._connect_deadline):
                return await LogClient.connect(self._url, **opts)
        except TimeoutError as e:
            raise UnavailableError(
                f"no NATS server answered at {self._url} within {self._connect_deadline:g} s"
            ) from e

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

        An owned connection is drained (those made in other, still running
        loops are drained there); an injected client is left open for its owner.
        """
        if self._closed:
            return
        self._closed = True
        here = asyncio.get_running_loop()
        shared = list(self._shared.values())
        self._shared.clear()
        for state in shared:
            if state.loop is here:
                await unshare(state)
            elif state.loop.is_running() and not state.loop.is_closed():
                asyncio.run_coroutine_threadsafe(unshare(state), state.loop)
        if not self._owns_client:
            return
        clients = list(self._clients.items())
        self._clients.clear()
        self._client = None
        for loop, client in clients:
            if loop is here:
                await release_connection(self._pool_key, client)
            elif loop.is_running() and not loop.is_closed():
                asyncio.run_coroutine_threadsafe(release_connection(self._pool_key, client), loop)

    async def __aenter__(self) -> ConvlogSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- authors -----------------------------------------------------------
    def hooks(self) -> RunHooks[Any]:
        """``RunHooks`` that tell this session which agent is running.

        Pass them to ``Runner.run(..., hooks=session.hooks())``.  The current
        agent is set on ``on_agent_start`` (and again on ``on_llm_start``), per
        run.  It deliberately does *not* switch on ``on_handoff``: the SDK fires
        that hook before it saves the handoff's ``function_call`` and
        ``function_call_output``, which belong to the agent handing off (as the
        SDK's own ``HandoffOutputItem`` says); the target becomes current when
        it starts.

        Raises:
            ImportError: the Agents SDK is missing.
        """
        if self._hooks is None:
            self._hooks = _hooks_class()(self)
        return self._hooks

    def set_current_agent(self, agent: str, *, context: Any = None) -> None:
        """Record ``agent`` as the author of the next non-user items.

        Args:
            agent: the agent's name.
            context: the run's ``RunContextWrapper`` (or a hook context of the
                same run): the name then applies to that run only.  Without it
                the name applies to every call that has no run-specific name.
        """
        if context is None:
            self._current_agent = agent
            return
        key_obj = _run_key(context)
        key = id(key_obj)
        if key not in self._run_agents:
            try:  # forget the run when the SDK drops it
                weakref.finalize(key_obj, self._run_agents.pop, key, None)
            except TypeError:
                self._current_agent = agent
                return
        self._run_agents[key] = agent

    def _agent_for(self, wrapper: Any) -> str:
        if wrapper is not None:
            name = self._run_agents.get(id(_run_key(wrapper)))
            if name:
                return name
        return self._current_agent or self.default_agent

    @staticmethod
    def _author(data: Mapping[str, Any], agent: str) -> str:
        role = data.get("role")
        if role == "user":
            return "user"
        if role in ("system", "developer"):
            return "system"
        return agent

    # -- what the process shares -------------------------------------------------
    def _state(self, client: LogClient) -> SharedSession:
        """The copy and append queue of this session id on ``client`` (shared in the process)."""
        state = self._shared.get(client)
        if state is None:
            state = self._shared[client] = share(client, self.session_id)
        return state

    async def _current_copy(self, client: LogClient, want: int | None) -> SessionCopy | None:
        """The process's copy of the session, brought up to date; ``None``: read the log."""
        if not self.follow:
            return None
        copy = self._state(client).get_copy()
        return copy if await copy.current(want, self.max_staleness) else None

    def _acked(self, client: LogClient, acks: list[Any], batch: list[dict[str, Any]]) -> None:
        """Tell the copy what an append of this process wrote (read your writes)."""
        copy = self._state(client).copy
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
        return await self._read_log(client, n)

    async def _read_log(self, client: LogClient, n: int | None) -> list[dict[str, Any]]:
        if n is None:
            return [env.data for env in await client.items(self.session_id, raw=False)]
        if n <= _TAIL_MAX:
            try:
                return [env.data for env in await client.tail(self.session_id, n)]
            except TooLargeError:
                pass  # the tail does not fit one reply: page forward instead
        last: deque[dict[str, Any]] = deque(maxlen=n)
        async for env in client.iter_items(self.session_id, raw=False):
            last.append(env.data)
        return list(last)

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
        data = [_plain(i) for i in items]
        fp_text = _canonical(data)
        fp = hashlib.sha256(fp_text).hexdigest()
        key = self._pending.get(fp)
        if key is None:
            key = new_item_id()
            self._pending[fp] = key
            while len(self._pending) > _MAX_PENDING_KEYS:
                self._pending.popitem(last=False)
        agent = self._agent_for(wrapper)
        batch = [
            {"item_id": f"{key}.{i}", "agent": self._author(d, agent), "kind": "item", "data": d}
            for i, d in enumerate(data)
        ]
        try:
            acks = await _finish(self._state(client).append(batch, len(fp_text)))
        except UnavailableError:
            raise  # outcome unknown: keep the key so a retry of this batch dedupes
        except BaseException:
            self._pending.pop(fp, None)
            raise
        self._pending.pop(fp, None)
        self._acked(client, acks, batch)

    async def pop_item(self, *, wrapper: Any = None) -> dict[str, Any] | None:
        """Hide the newest visible item with a ``retract`` and return it (``None`` when empty).

        The retract is conditional on the session's last order, so a write by
        another process in between makes this pop look again rather than hide
        an item that is no longer the newest.
        """
        client = await self._log()
        agent = self._agent_for(wrapper)
        for attempt in range(_POP_ATTEMPTS):
            copy = await self._current_copy(client, 1)
            newest = copy.newest() if copy is not None else None
            if copy is not None and newest is not None:
                (order, data), last = newest, copy.last
            elif copy is not None and copy.empty:
                return None
            else:
                rep = await client.read(self.session_id, tail=1)
                if not rep.items:
                    return None
                order, data, last = rep.items[0].item_order, rep.items[0].data, rep.last_order
            retract = {
                "item_id": f"{new_item_id()}.r",
                "agent": agent,
                "kind": "retract",
                "data": {"target": order},
            }
            try:
                reply = await _finish(
                    client.append(self.session_id, [retract], expected_last=last)
                )
            except ConflictError:
                if copy is not None:
                    await copy.fill()  # someone wrote after what the copy holds
                await asyncio.sleep(CONFLICT_BACKOFF.delay(attempt - 1) if attempt else 0)
                continue
            self._acked(client, reply.items, [retract])
            return data
        raise UnavailableError(
            f"pop_item on session {self.session_id!r} lost the race to other writers "
            f"{_POP_ATTEMPTS} times in a row"
        )

    async def clear_session(self, *, wrapper: Any = None) -> None:
        """Hide every item so far with a ``clear``; nothing is written when nothing is visible."""
        client = await self._log()
        copy = await self._current_copy(client, 1)
        if copy is not None and copy.empty:
            return
        if copy is None or copy.newest() is None:
            if not (await client.read(self.session_id, tail=1)).items:
                return
        entry = {
            "item_id": f"{new_item_id()}.c",
            "agent": self._agent_for(wrapper),
            "kind": "clear",
            "data": {},
        }
        reply = await _finish(client.append(self.session_id, [entry]))
        self._acked(client, reply.items, [entry])

    async def _atomic_replace_items(self, items: list[Any]) -> bool:
        """Replace the visible history with ``items``: a ``clear`` and the items, in ONE append.

        The SDK's ``OpenAIResponsesCompactionSession`` calls this (when the
        session has it) instead of ``clear_session()`` then ``add_items()``, so
        no reader ever sees the history empty in between and a crash leaves
        the old history or the new one.  The log keeps every item the clear
        hides.  Like the SDK's own stores, it does not check whether the
        history changed since the compaction read it.  The clear and the
        non-user items are recorded as ``system`` (compaction is nobody's turn).

        Returns:
            True when replaced; False for a subclass that overrides how items
            are read or written (the SDK then clears and adds through them).
        """
        cls = type(self)
        if cls.add_items is not ConvlogSession.add_items or cls.get_items is not ConvlogSession.get_items:
            return False
        client = await self._log()
        key = new_item_id()
        batch = [{"item_id": f"{key}.c", "agent": "system", "kind": "clear", "data": {}}]
        batch += [
            {"item_id": f"{key}.{i}", "agent": self._author(d, "system"), "kind": "item", "data": d}
            for i, d in enumerate(_plain(i) for i in items)
        ]
        reply = await _finish(client.append(self.session_id, batch))
        self._acked(client, reply.items, batch)
        return True

    def __repr__(self) -> str:
        limit = getattr(self.session_settings, "limit", None)
        return f"ConvlogSession({self.session_id!r}, limit={limit}, agent={self.default_agent!r})"
