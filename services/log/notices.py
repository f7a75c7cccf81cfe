"""Turn notices for user messages: published after the commit, redone if lost.

The log service tells the agent that must answer a committed user message,
and only that agent (:mod:`shared.work` has the notice and its subjects):

* :class:`Notifier` is a commit listener (both stores call it, in commit
  order, once the items are durable).  For each user message it publishes a
  notice on ``<prefix>.work.agent.<active>``, where ``active`` is the agent
  the last handoff output this process committed in that session names
  (while every item since is this process's: one another instance committed
  may be a handoff), or else the routing checkpoint in the KV bucket checked
  against the log (the ``to`` of a new session, or what workers recorded, and
  the log's handoffs after it), or else ``<prefix>.work.entry`` -- which is also
  where a notice goes when no agent of that name has a consumer on the work
  stream (a ``to`` naming an agent nobody runs: the entry agent answers, as
  routing says).  The address is a hint: a worker that finds another agent
  active forwards the notice.  An item whose id starts no turn
  (``noturn:``, :func:`shared.work.starts_no_turn`: its writer answers it)
  is announced to nobody, here or by the reconciler.
* :class:`.reconciler.Reconciler` redoes the notices a crash (or a publish
  the work stream never acknowledged) may have lost.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, NamedTuple

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client

from shared.failures import cancel_and_wait, is_transient
from shared.inbox import Message
from shared.messages import AgentName
from shared.routing import RoutingCheckpoint, decode_checkpoint, encode_checkpoint
from shared.signing import turn_id_agent
from shared.subjects import Subjects
from shared.wire import over_max_payload
from shared.work import (
    Notice,
    encode_notice,
    handoff_target_of,
    notice_msg_id,
    now,
    starts_no_turn,
    work_entry_subject,
    work_stream_name,
    work_subject,
)

from .pubacks import AckedPublisher
from .recent import Recent
from .store.base import Committed, LogStore

__all__ = ["USER_MARK", "Head", "Notifier", "head_of", "is_user_message"]

log = logging.getLogger("convlog.log.notices")

_MISSING_KEY = (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError)
#: Bytes every user item's envelope holds (a cheap test before decoding).
USER_MARK = b'"agent":"user"'
#: The agents' consumers on the work stream (services.worker.intake.consumer_name).
CONSUMER_PREFIX = "convlog-agent-"
_AGENTS_EVERY = 10.0
_RECHECK_MISSING = 1.0
#: How long the reconciler waits for a notice still being published (its ack waits 5 s).
_SETTLE_WAIT = 10.0
_HANDOFF = b'"function_call_output"'
#: Notices being published at most (each holds its envelopes until its ack or its
#: timeout); beyond, a commit's notices are left to the reconciler (see :class:`Notifier`).
MAX_PENDING = 4_096
#: A page of the log read to follow a session's handoffs (:meth:`Notifier.address`).
_READ_PAGE = 1_000
_READ_BYTES = 1 << 20
_ABSENT = "\0absent"  # no agent's name: the log holds no item at that order


def _agent_name(name: str) -> bool:
    """Whether a routing checkpoint can name ``name`` as its active agent."""
    try:
        msgspec.convert(name, AgentName)
    except msgspec.ValidationError:
        return False
    return True


class Head(msgspec.Struct):
    session_id: str
    item_order: int
    agent: str
    item_id: str = ""
    kind: str = "item"
    data: dict[str, Any] = {}


head_of = msgspec.json.Decoder(Head)
"""Decodes the fields of an envelope a notice needs."""


def is_user_message(env: Head) -> bool:
    d = env.data
    return env.kind == "item" and env.agent == "user" and d.get("role") == "user" \
        and d.get("type", "message") == "message"


class _Pending(NamedTuple):
    """A notice decided on by a commit, published with the others of that commit."""

    sid: str
    order: int
    msg_id: str
    items: tuple[msgspec.Raw, ...]
    handoff_to: str | None


def _handoff_not_published(sid: str, order: int, err: Exception) -> None:
    # Best effort: the handing-off worker announces it too (same Nats-Msg-Id).
    log.info("handoff notice of %s #%d not published: %r", sid, order, err)


class Notifier:
    """Publishes the notice of each committed user message (see the module docstring).

    Args:
        nc: the log service's connection.
        subjects: subject names.
        kv: the routing bucket (read only: the checkpoint's ``active``).
        remember: sessions whose last handoff target is kept in memory.
        sole_writer: this process is the only one appending to its sessions
            (the SQLite store), so it wrote every routing checkpoint a ``to``
            left before a session's first item: that item's notice carries it
            (:attr:`shared.work.Notice.entry`), and the worker needs no look-up
            -- unless a checkpoint was already there (:meth:`note_entry`).
        max_pending: most notices being published at once.  While the work
            stream answers slowly or not at all (no quorum) the store goes on
            committing, and each notice waits up to its ack timeout: the
            notices beyond this are not published here (nor counted as sent),
            so the reconciler republishes them once the stream answers.
        store: the log: a session's address is its routing checkpoint checked against
            the log, and the log's handoffs after it applied (the log wins).
        repair: called with ``(session, order, target)`` for a handoff the log holds
            after the session's checkpoint (the routing writer writes it).
    """

    def __init__(self, nc: Client, subjects: Subjects, kv: Any, *, remember: int = 100_000,
                 sole_writer: bool = False, max_pending: int = MAX_PENDING, store: LogStore | None = None,
                 repair: Callable[[str, int, str], None] | None = None) -> None:
        self.nc = nc
        self.subjects = subjects
        self.kv = kv
        self.store = store
        self.repair = repair
        self.remember = remember
        self.sole_writer = sole_writer
        self.max_pending = max_pending
        self.published = 0
        self.failed = 0
        self.dropped = 0  # notices left to the reconciler: max_pending were being published
        self._pending = 0  # notices being published (spawned, not yet settled)
        self._dropping = False  # the last notice was left to the reconciler (logged once)
        self._active: OrderedDict[str, str] = OrderedDict()
        #: per session: the last order this process committed (what ``_active`` follows)
        self._seen: OrderedDict[str, int] = OrderedDict()
        #: per session: the entry this process wrote to the routing bucket (None: one was there)
        self._entries: OrderedDict[str, str | None] = OrderedDict()
        #: per session: set once the entry this process is writing is written (or not)
        self._writing: dict[str, asyncio.Event] = {}
        self._sent: OrderedDict[str, None] = OrderedDict()  # msg ids published (or being)
        self._inflight: dict[str, asyncio.Event] = {}  # msg ids being published: set once settled
        self._tasks: set[asyncio.Task[None]] = set()
        self._batch: list[_Pending] = []  # this commit's notices, see on_commit
        #: per session: set once the notices of the last commit holding some of its notices are
        #: handed to the publisher (or given up); a later commit's wait for it (:meth:`_publish`)
        self._handing: dict[str, asyncio.Future[None]] = {}
        self._acks = AckedPublisher(nc)
        self._agents: set[str] | None = None  # agents with a consumer on the work stream
        self._agents_at = 0.0
        self._missing_at = 0.0
        self._refreshing: asyncio.Task[None] | None = None
        #: traceparent per committed item, (sid, order) -> bytes (services/log/traces.py)
        self.traces: dict[tuple[str, int], bytes] = {}
        #: No outbox pops ``traces`` (a store that writes the items itself): the notices do,
        #: and a committed item with no notice has its entry dropped at commit.
        self.owns_traces = False
        self.recent = Recent()  # what the notices carry

    def on_commit(self, committed: Sequence[Committed]) -> None:
        """Commit listener: a notice per user message, in commit order per session.

        A handoff output gets its notice here too, carrying the session's
        recent items; the handing-off worker announces it as well (the durable
        path: same ``Nats-Msg-Id``, so the stream keeps the first of the two).
        """
        for c in committed:
            env = c.envelope
            self.recent.add(c.session_id, c.item_order, env)
            if self._seen.get(c.session_id, 0) != c.item_order - 1:
                # The items before it are another instance's (JetStream store): one may be
                # a handoff this process never saw, so what it remembers is stale; the
                # checkpoint and the log address the session's next notice.
                self._active.pop(c.session_id, None)
            self._keep(self._seen, c.session_id, c.item_order)
            user = USER_MARK in env
            if not user and _HANDOFF not in env:
                continue
            try:
                head = head_of.decode(env)
            except msgspec.DecodeError:
                continue
            no_turn = starts_no_turn(head.item_id)  # its writer answers it (shared.work)
            if not user:
                target = handoff_target_of(head.data) if head.kind == "item" else None
                if target is not None:
                    self.note_active(head.session_id, target)
                    if turn_id_agent(head.item_id) is not None and not no_turn \
                            and not self._handoff_now(head.session_id, head.item_order, target):
                        self._start(head.session_id, head.item_order, target)  # the target continues it
                continue
            if is_user_message(head) and not no_turn:
                self._start(head.session_id, head.item_order)
        if self.owns_traces and self.traces:  # what no notice of this commit will take
            noticed = {(p.sid, p.order) for p in self._batch}
            for c in committed:
                if (c.session_id, c.item_order) not in noticed:
                    self.traces.pop((c.session_id, c.item_order), None)
        if self._batch:  # one task, one flush and one wait for the acks per commit
            batch, self._batch = self._batch, []
            self._pending += len(batch)
            # Addressing a notice may wait (a routing look-up, the agents listed again), and
            # a later commit's may not: its notices go out behind those of the earlier commits
            # of their sessions, or a worker (it takes a session's notices in arrival order)
            # would answer a session's second message before its first.
            handed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            before: set[asyncio.Future[None]] = set()
            for sid in {p.sid for p in batch}:
                if (earlier := self._handing.get(sid)) is not None:
                    before.add(earlier)
                self._handing[sid] = handed
            self._spawn(self._publish(batch, before, handed))

    def _full(self) -> bool:
        """Whether ``max_pending`` notices are being published (or queued by this commit)."""
        return self._pending + len(self._batch) >= self.max_pending

    def _handoff_now(self, sid: str, order: int, target: str) -> bool:
        """Publish a handoff's notice from the commit listener itself, written to the
        socket before this commit's replies and items are even queued: the next part
        of the turn waits for it, nobody waits for those.  False: not sent (the agent
        list is stale or lacks ``target``, or the connection has something queued):
        it goes with the commit's other notices."""
        agents = self._agents
        if agents is None or target not in agents or time.monotonic() - self._agents_at > _AGENTS_EVERY \
                or self._full():
            return False
        # Its trace context is taken only once it is sent: else the commit's other notices carry it.
        message = self._message(work_subject(self.subjects, target), _Pending(
            sid, order, notice_msg_id(sid, order), self.recent.carry(sid, order), target),
            self.traces.get((sid, order)))
        acked = self._acks.publish_now([message])
        if acked is None:
            return False
        if self.owns_traces:
            self.traces.pop((sid, order), None)
        self._pending += 1
        self._spawn(self._log_handoff(sid, order, acked))
        return True

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` in a task of its own, kept until done (:meth:`stop` waits for them)."""
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _log_handoff(self, sid: str, order: int, acked: Awaitable[list[Exception | None]]) -> None:
        try:
            (err,) = await acked
        finally:
            self._pending -= 1
        if err is not None:
            _handoff_not_published(sid, order, err)

    def _message(self, subject: str, p: _Pending, parent: bytes | None = None) -> Message:
        """``p``'s notice on ``subject``, with its id and the trace of its item (``parent``,
        else the one the outbox still holds)."""
        notice = Notice(session_id=p.sid, item_order=p.order, kind="handoff" if p.handoff_to else "user",
                        ts=now(), items=p.items, entry=self._first_entry(p))
        parent = parent or self._trace(p)  # the outbox pops it, for the items subject
        headers = {"traceparent": parent.decode()} if parent else {}
        headers["Nats-Msg-Id"] = p.msg_id
        payload = encode_notice(notice)
        if p.items and over_max_payload(self.nc, payload, headers):
            # The items a server of a small max_payload cannot carry: its worker reads them
            # (refused, the notice would wait for the reconciler's next sweep).
            payload = encode_notice(msgspec.structs.replace(notice, items=()))
        return subject, payload, headers

    def _trace(self, p: _Pending) -> bytes | None:
        key = (p.sid, p.order)
        return self.traces.pop(key, None) if self.owns_traces else self.traces.get(key)

    def was_sent(self, msg_id: str) -> bool:
        return msg_id in self._sent

    async def settled(self, msg_id: str, within: float = _SETTLE_WAIT) -> bool:
        """Whether this process published ``msg_id``, once a publish still under way has
        its outcome: a publish that fails late (its ack waited out) is the reconciler's
        to redo, so it must not ack past it meanwhile.  Still unsettled after
        ``within`` seconds: ``False`` (a republish the work stream drops if the first
        one was stored after all; same ``Nats-Msg-Id``)."""
        event = self._inflight.get(msg_id)
        if event is not None:
            try:
                async with asyncio.timeout(within):
                    await event.wait()
            except TimeoutError:
                return False
        return msg_id in self._sent

    def note_active(self, sid: str, agent: str) -> None:
        """Remember that ``agent`` answers ``sid``'s next user message (``""``: the entry agent)."""
        self._keep(self._active, sid, agent)

    def note_active_unless_known(self, sid: str, agent: str) -> None:
        """:meth:`note_active`, unless an agent is already noted for ``sid``."""
        if sid not in self._active:
            self.note_active(sid, agent)

    def _start(self, sid: str, order: int, handoff_to: str | None = None) -> None:
        msg_id = notice_msg_id(sid, order)
        if self._full():
            # Not sent, so not in _sent: the reconciler republishes it (a handoff's
            # notice is announced by its worker too).
            if not self._dropping:
                log.warning("%d turn notices are being published: the next ones are left to the "
                            "reconciler until the work stream answers", self._pending)
            self._dropping = True
            self.dropped += 1
            return
        self._dropping = False
        if handoff_to is None:
            self._sent[msg_id] = None
            self._inflight[msg_id] = asyncio.Event()
            if len(self._sent) > self.remember:
                self._sent.popitem(last=False)
        self._batch.append(_Pending(sid, order, msg_id, self.recent.carry(sid, order), handoff_to))

    def _first_entry(self, p: _Pending) -> str | None:
        """What the routing bucket holds for a session whose first item ``p`` is: the
        entry this process wrote (:meth:`note_entry`), or ``""`` (nothing); ``None`` for
        any other notice, or when another process may have written it."""
        if not self.sole_writer or p.handoff_to is not None or p.order != 1:
            return None
        return self._entries.get(p.sid, "")

    async def _drop_stale_entry(self, sid: str) -> None:
        """Delete what the routing bucket holds for ``sid``, whose first message was just
        announced with no entry (:meth:`_first_entry`: this process wrote none).  A value
        there is stale -- a ``to`` a log service that died before committing its message
        wrote, or a checkpoint of the session id's life before the log was restored -- and
        a worker without the first notice's fact (another agent's, a restarted one) would
        route the session's next messages by it, not as the first one was.  Compare-and-set
        on its revision: a value written meanwhile (a handoff's checkpoint) stays."""
        try:
            entry = await self.kv.get(sid)
            await self.kv.delete(sid, last=entry.revision)
        except _MISSING_KEY:
            return
        except Exception as e:  # written meanwhile, or NATS failing: workers check what they read
            log.info("could not drop the stale routing value of %s: %r", sid, e)
            return
        log.warning("routing value of %s dropped: its first message named no agent, and this "
                    "log service wrote none", sid)

    def writing_entry(self, sid: str) -> None:
        """This process is writing ``sid``'s entry to the routing bucket (a message with
        ``to``, before its append): a first message committed meanwhile (another one,
        without ``to``) is announced once the outcome is known (:meth:`note_entry`), with
        that entry, the one workers will find in the bucket."""
        self._keep(self._entries, sid, None)
        self._writing.setdefault(sid, asyncio.Event())

    def note_entry(self, sid: str, agent: str | None) -> None:
        """This process wrote ``agent`` as ``sid``'s entry to the routing bucket, before
        appending the message whose ``to`` named it; ``None``: a checkpoint was already
        there (a retry of a message whose first attempt wrote it, two first messages at
        once), or the write failed, so the session's first notice carries no entry: the
        worker reads the bucket."""
        self._keep(self._entries, sid, agent)
        if (writing := self._writing.pop(sid, None)) is not None:
            writing.set()

    @staticmethod
    async def _entry_written(writing: asyncio.Event) -> None:
        """Wait (a bounded time: then the notice carries no entry) for an entry being written."""
        try:
            async with asyncio.timeout(_SETTLE_WAIT):
                await writing.wait()
        except TimeoutError:
            pass

    def _keep(self, table: OrderedDict[str, Any], sid: str, value: Any) -> None:
        """``table[sid] = value``, the newest; the oldest beyond ``remember`` are dropped."""
        table[sid] = value
        table.move_to_end(sid)
        if len(table) > self.remember:
            table.popitem(last=False)

    async def address(self, sid: str, order: int = 0) -> str:
        """The subject the user message at ``order`` of ``sid`` is announced on."""
        agent = self._active.get(sid)
        if agent is None and order == 1:
            agent = ""  # a new session: only a `to` (noted by the handler) names its agent
        if agent is None:
            agent = await self._routed(sid, order)
            if sid not in self._active:  # a handoff committed meanwhile is newer
                self.note_active(sid, agent)
        if agent and agent not in await self._known_agents(agent):
            agent = ""
        return work_subject(self.subjects, agent) if agent else work_entry_subject(self.subjects)

    async def _routed(self, sid: str, order: int) -> str:
        """The active agent before ``order`` (0: after the session's last item) by the
        routing checkpoint and the log after it; ``""``: the entry agent.  The log wins:
        a checkpoint citing an item the log does not hold as its handoff is followed
        from the session's start, and the log's handoffs after it are applied -- one
        whose checkpoint was never written (the process died in the write's delay, the
        bucket was purged) would otherwise address every later turn of the session to
        the agent before it, and cost a forward each, until the next handoff.  Such a
        handoff is handed to :attr:`repair`, which writes its checkpoint.  A checkpoint
        the log disproves (one of a log restored from an older copy, ahead of it) is
        replaced by the log's (:meth:`_replace_disproved`)."""
        try:
            entry = await self.kv.get(sid)
            cp = decode_checkpoint(entry.value or b"")
        except (*_MISSING_KEY, msgspec.DecodeError):
            cp = None
        if self.store is None:
            return cp.active if cp is not None else ""
        disproved = False
        try:
            agent, after = "", 0
            if cp is not None and cp.order == 0:
                agent = cp.active
            elif cp is not None:
                held = await self._handoff_at(sid, cp.order)
                # An item this store does not hold yet (another instance's, read from a
                # replica that trails) does not disprove the checkpoint; an other one does.
                if held == cp.active or (held is _ABSENT and not self.sole_writer):
                    agent, after = cp.active, cp.order
                else:
                    agent, disproved = cp.entry or "", True
            last: tuple[int, str] | None = None
            while order == 0 or after < order - 1:
                page = await self.store.read(sid, after=after, limit=_READ_PAGE, max_bytes=_READ_BYTES)
                for raw in page.items:
                    head = head_of.decode(raw)
                    if order and head.item_order >= order:
                        break
                    target = handoff_target_of(head.data) if head.kind == "item" else None
                    if target:
                        agent, last = target, (head.item_order, target)
                if not page.items or not page.more:
                    break
                after = head_of.decode(page.items[-1]).item_order
        except Exception as e:  # the store failing: the checkpoint is a hint as good as any
            log.info("could not follow the log of %s to address its notice: %r", sid, e)
            return cp.active if cp is not None else ""
        if disproved:
            assert cp is not None and entry.revision is not None
            self._spawn(self._replace_disproved(sid, entry.revision, cp, last))
        elif last is not None and self.repair is not None and (cp is None or last[0] > cp.order):
            self.repair(sid, *last)
        return agent

    async def _replace_disproved(self, sid: str, revision: int, cp: RoutingCheckpoint,
                                 last: tuple[int, str] | None) -> None:
        """Replace ``sid``'s checkpoint ``cp`` (at ``revision``), which the log disproves,
        by the log's last handoff ``last`` (or the entry, kept; none: deleted).  Left as
        it is, a worker without facts of its own would replay the whole log at each turn
        (warning once the log is past ``cp.order``), and the routing writer, moving
        checkpoints forward only, would write no handoff the log commits up to ``cp.order``.  Compare-and-set on ``revision``: a value written
        meanwhile stays."""
        if last is not None and not _agent_name(last[1]):
            last = None  # a handoff to a name no agent can have: the checkpoint could not name it
        try:
            order, active = last if last is not None else (0, cp.entry)
            if active is None:
                await self.kv.delete(sid, last=revision)
            else:
                await self.kv.update(sid, encode_checkpoint(RoutingCheckpoint(
                    active=active, order=order, entry=cp.entry, entry_proof=cp.entry_proof)), last=revision)
        except Exception as e:  # written meanwhile, or NATS failing: workers check what they read
            log.info("could not replace the routing checkpoint of %s: %r", sid, e)
            return
        log.warning("routing checkpoint of %s said %s is active after #%d, which the log disproves "
                    "(a log restored from an older copy?): replaced by the log's (%s)", sid, cp.active,
                    cp.order, f"{last[1]} after #{last[0]}" if last is not None else "its entry agent")

    async def _handoff_at(self, sid: str, order: int) -> str | None:
        """The agent the log's item ``order`` hands off to, ``None``, or :data:`_ABSENT`
        (the store holds no such item)."""
        assert self.store is not None
        page = await self.store.read(sid, after=order - 1, limit=1, max_bytes=_READ_BYTES)
        head = head_of.decode(page.items[0]) if page.items else None
        if head is None or head.item_order != order:
            return _ABSENT
        if head.kind != "item":
            return None
        return handoff_target_of(head.data)

    async def _known_agents(self, wanted: str | None = None) -> set[str]:
        """Agents with a durable consumer on the work stream (listed again every 10 s, and
        at most once a second when ``wanted`` is not among them: a worker that bound since
        the last listing gets its notices at once, not via the entry agent)."""
        now_ = time.monotonic()
        missing = wanted is not None and self._agents is not None and wanted not in self._agents \
            and now_ - self._missing_at > _RECHECK_MISSING
        if missing:
            self._missing_at = now_
        idle = self._refreshing is None or self._refreshing.done()
        if idle and (missing or now_ - self._agents_at > _AGENTS_EVERY):
            self._refreshing = asyncio.create_task(self._list_agents())
        if self._agents is None or missing:
            await asyncio.shield(self._refreshing)  # type: ignore[arg-type]
        return self._agents or set()

    async def _list_agents(self) -> None:
        try:
            infos = await self.nc.jetstream().consumers_info(work_stream_name(self.subjects))
        except Exception as e:
            log.info("cannot list the work stream's consumers: %r", e)
            self._agents = self._agents if self._agents is not None else set()
            return
        self._agents = {i.name.removeprefix(CONSUMER_PREFIX) for i in infos
                        if i.name and i.name.startswith(CONSUMER_PREFIX)}
        self._agents_at = time.monotonic()

    async def _publish(self, batch: list[_Pending], before: set[asyncio.Future[None]],
                       handed: asyncio.Future[None]) -> None:
        """Publish one commit's notices, in order, behind ``before`` (the earlier commits'
        of the same sessions: handed to the publisher, or given up), and wait for the work
        stream's acks; then the user notices are settled (:meth:`settled`), also when
        cancelled: a notice whose outcome is not known then is not counted as sent.
        ``handed`` is set once this commit's are handed over (or given up)."""
        done = False
        try:
            await self._publish_batch(batch, before, handed)
            done = True
        finally:
            if not handed.done():
                handed.set_result(None)
            for p in batch:
                if self._handing.get(p.sid) is handed:
                    del self._handing[p.sid]
            self._pending -= len(batch)
            for p in batch:
                if p.handoff_to is None and (event := self._inflight.pop(p.msg_id, None)) is not None:
                    if not done:
                        self._sent.pop(p.msg_id, None)
                    event.set()

    async def _publish_batch(self, batch: list[_Pending], before: set[asyncio.Future[None]],
                             handed: asyncio.Future[None]) -> None:
        sending: list[_Pending] = []
        messages: list[Message] = []
        # Before the first await (a routing lookup): the outbox pops each item's trace
        # context as it publishes the item, and it does not wait for this.
        parents = [self._trace(p) for p in batch]
        try:
            for p, parent in zip(batch, parents, strict=True):
                if p.handoff_to is not None:
                    if p.handoff_to not in await self._known_agents(p.handoff_to):
                        continue  # nobody plays it; the worker's own announcement decides
                    subject = work_subject(self.subjects, p.handoff_to)
                else:
                    if p.order == 1 and (writing := self._writing.get(p.sid)) is not None:
                        await self._entry_written(writing)
                    subject = await self.address(p.sid, p.order)
                sending.append(p)
                messages.append(self._message(subject, p, parent))
                if self._first_entry(p) == "":  # told its worker the bucket holds nothing
                    self._spawn(self._drop_stale_entry(p.sid))
            if before := {f for f in before if not f.done()}:
                await asyncio.wait(before)  # (not cancelled along with this task)
            # Set before the send: the commits waiting for it resume on a later loop turn,
            # once this one's notices are written (publish does not suspend before that).
            handed.set_result(None)
            outcomes = await self._send(sending, messages)
        except Exception as e:
            sending = [p for p in batch if p.handoff_to is None or p in sending]
            outcomes = [e] * len(sending)
        for p, err in zip(sending, outcomes, strict=True):
            if p.handoff_to is None and err is not None:
                self._sent.pop(p.msg_id, None)  # before the reconciler, waiting on it, looks
            if err is None:
                self.published += p.handoff_to is None
            elif p.handoff_to is not None:
                _handoff_not_published(p.sid, p.order, err)
            else:
                # The reconciler republishes it; a bug here must still be seen.
                self._sent.pop(p.msg_id, None)
                self.failed += 1
                level = logging.INFO if is_transient(err) or isinstance(err, nats.errors.Error) else logging.ERROR
                log.log(level, "notice of %s #%d not published (the reconciler will): %r", p.sid, p.order, err)

    async def _send(self, sending: list[_Pending], messages: list[Message]) -> list[Exception | None]:
        """User notices go together (merged with other commits' into atomic
        batches when the service is loaded: one fsync for many, see
        :mod:`.pubacks`); handoff notices one publish each, as the
        handing-off worker's copy (same id) often reached the stream first,
        and an atomic batch holding a stored id is refused whole."""
        user = [i for i, p in enumerate(sending) if p.handoff_to is None]
        if len(user) == len(sending):
            return await self._acks.publish_together(messages)
        if not user:  # a turn's handoff: out at once (no task hop), ahead of the worker's copy
            return await self._acks.publish(messages)
        other = [i for i, p in enumerate(sending) if p.handoff_to is not None]
        got_user, got_other = await asyncio.gather(
            self._acks.publish_together([messages[i] for i in user]),
            self._acks.publish([messages[i] for i in other]),
        )
        outcomes: list[Exception | None] = [None] * len(sending)
        for i, o in [*zip(user, got_user, strict=True), *zip(other, got_other, strict=True)]:
            outcomes[i] = o
        return outcomes

    async def stop(self, within: float = 2.0) -> None:
        """Let the notices of the last commits go out (up to ``within``), then give up
        on the rest: the reconciler of the next start republishes them."""
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=within)
            await cancel_and_wait(pending, within=1.0)
        if self._refreshing is not None:
            await cancel_and_wait({self._refreshing}, within=1.0)
        await self._acks.close()
