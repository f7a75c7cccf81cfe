"""What ``convlog bench --turns`` watches: replies, the workers' timings, deliveries.

* :class:`ReplyWatcher` resolves one future per turn when the turn's terminal
  item (reply or failure) is committed, from one ordered JetStream consumer on
  every items subject, and counts terminal items per turn: a turn answered
  twice is *doubled*, one never answered within the wait is *lost*, one that
  ended with its failure an error (not a timed turn).
* :class:`Timings` collects what workers started with ``--publish-timings``
  record per part of a turn (``<prefix>.timings.turn``): delivery, routing,
  history read, model, reply append -- measured where they happen.
* :func:`deliveries` sums what the work stream's agent consumers delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, defaultdict
from typing import Any

import msgspec
import nats.js.errors
from nats.js.api import ConsumerConfig, DeliverPolicy

from shared.client import LogClient, new_item_id
from shared.work import work_stream_name

__all__ = ["ReplyWatcher", "Timings", "TurnFailed", "deliveries"]

_decode = msgspec.json.Decoder(dict[str, Any])


class TurnFailed(Exception):
    """A turn ended with its ``fail`` item (the agent could not answer), not a reply."""


class ReplyWatcher:
    """Sends user messages and times them until their turn's terminal item is committed."""

    def __init__(self, client: LogClient) -> None:
        self.client = client
        self.waiting: dict[str, asyncio.Future[float]] = {}
        self.terminals: Counter[str] = Counter()
        self.sent: dict[str, float] = {}  # turn -> seconds the send took (the user's append)
        self.totals: dict[str, float] = {}  # turn -> seconds until its terminal item arrived
        self._sub: Any = None

    async def start(self) -> None:
        from services.worker.turn_ids import parse_turn_item_id

        async def on_item(msg: Any) -> None:
            tid = parse_turn_item_id(_decode.decode(msg.data).get("item_id", ""))
            if tid is not None and tid.terminal:
                self.terminals[tid.turn] += 1
                fut = self.waiting.pop(tid.turn, None)
                if fut is not None and not fut.done():
                    if tid.role == "fail":  # answered, but not a reply: no turn's time to count
                        fut.set_exception(TurnFailed(f"{tid.agent} failed to answer turn {tid.turn}"))
                    else:
                        fut.set_result(time.perf_counter())

        js = self.client.nc.jetstream()
        self._sub = await js.subscribe(
            self.client.subjects.items_all, cb=on_item, ordered_consumer=True,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.NEW),
        )

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    async def turn(self, session_id: str, text: str, *, to: str | None = None, within: float = 30.0) -> float:
        """Send one user message; return seconds until its turn's terminal item was committed.

        Raises:
            TimeoutError: not answered within ``within`` seconds (counted lost by the caller).
            TurnFailed: the turn ended with its ``fail`` item, not a reply (an error).
        """
        from services.worker.turn_ids import turn_key

        item_id = new_item_id()
        key = turn_key(item_id)
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.waiting[key] = fut
        t0 = time.perf_counter()
        try:
            await self.client.send(session_id, text, item_id=item_id, to=to)
            self.sent[key] = time.perf_counter() - t0
            async with asyncio.timeout(within):
                total = await fut - t0
            self.totals[key] = total
            return total
        finally:
            self.waiting.pop(key, None)

    def doubled(self, turns: set[str] | None = None) -> int:
        return sum(1 for k, n in self.terminals.items() if n > 1 and (turns is None or k in turns))


class Timings:
    """Per-phase seconds of each turn part, as the workers recorded them."""

    PHASES = ("delivery", "routing", "history_read", "model", "reply_append")

    def __init__(self, client: LogClient) -> None:
        self.client = client
        self.parts: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self._sub: Any = None

    async def start(self) -> None:
        async def on_record(msg: Any) -> None:
            with contextlib.suppress(msgspec.DecodeError):
                rec = _decode.decode(msg.data)
                self.parts[str(rec.get("turn"))].append(rec)

        self._sub = await self.client.nc.subscribe(f"{self.client.subjects.prefix}.timings.turn", cb=on_record)

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    def breakdown(self, turns: dict[str, tuple[float, float]]) -> dict[str, list[float]]:
        """Seconds per phase for each turn of ``turns`` (turn -> (append, total)).

        ``append`` is the user's send round trip, the worker phases are summed
        over the turn's parts (a handoff turn has two), and ``rest`` is what
        the total leaves: JetStream publishes, the worker's own bookkeeping,
        and the reply's way back to the client.  A turn of several parts also
        gets each part's phases under ``<agent>.<phase>`` (and ``<agent>.part``,
        the part from its notice's arrival to its ack, which for a handing-off
        part runs past the next part's start: its announcement and ack).
        """
        out: dict[str, list[float]] = defaultdict(list)
        for turn, (append, total) in turns.items():
            parts = self.parts.get(turn)
            if not parts:
                continue
            out["append"].append(append)
            known = append
            for phase in self.PHASES:
                v = sum(float(p.get(phase) or 0.0) for p in parts)
                out[phase].append(v)
                known += v
            out["rest"].append(max(0.0, total - known))
            if len(parts) > 1:
                for p in parts:
                    for phase in (*self.PHASES, "part"):
                        out[f"{p.get('agent')}.{phase}"].append(float(p.get(phase) or 0.0))
        return out


async def deliveries(client: LogClient) -> int:
    """Notices delivered by every agent consumer of the work stream so far (redeliveries too)."""
    js = client.nc.jetstream()
    stream = work_stream_name(client.subjects)
    total = 0
    try:
        infos = await js.consumers_info(stream)
    except nats.js.errors.NotFoundError:
        return 0
    for info in infos:
        if info.name and info.name.startswith("convlog-agent-"):
            total += (info.delivered.consumer_seq if info.delivered else 0) or 0
    return total
