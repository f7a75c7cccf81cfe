"""``convlog health``: is the stack serving, and is every part keeping up?

Exit 0 when all of these hold, else 1 with one ``FAIL`` line per problem:

1. **NATS** answers at ``CONVLOG_NATS_URL``.
2. **The log service answers**: at least one instance replies to
   ``$SRV.STATS.convlog-log`` for this prefix, and a read request is
   answered within ``--timeout``.
3. **The fan-out is current**: on every instance, the oldest committed item
   not yet published on ``<prefix>.items.<sid>`` is at most ``--max-lag``
   seconds old (the log service reports this in its ``$SRV.STATS`` data).
4. **Every agent's consumer is draining**: for each durable consumer
   ``convlog-agent-<agent>`` on the work stream (and each agent of
   ``--agents``/``CONVLOG_AGENTS`` when given: a missing consumer means no
   worker of it ever started), watched for ``--window`` seconds: envelopes
   waiting to be delivered must be delivered or acked during the window, and
   with nothing in flight some worker must be pulling -- except on the idle
   consumer of an agent the given spec no longer has (nothing waits on it).

``--every S`` repeats the check every ``S`` seconds and prints one line per
run (for a process manager's log); it never exits.  ``--wait S`` checks again
until the stack is healthy, for at most ``S`` seconds (for a script that has
just started it), then reports as a single check does.  Both together: the
first run waits so (silently), so a watcher started with the stack does not
log the stack's own start as ``UNHEALTHY``; the runs after it do not wait.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.config import Settings

from .common import positive_float

__all__ = ["HEALTH_DESCRIPTION", "Report", "check", "cmd_health", "health_arguments"]

HEALTH_DESCRIPTION = textwrap.fill(
    "Exit 0 when NATS answers, the log service answers ($SRV.STATS and a read), the fan-out "
    "is current (the oldest committed item not yet on <prefix>.items.<sid> is at most "
    "--max-lag seconds old) and every agent's consumer is draining (watched for --window "
    "seconds); otherwise exit 1 with one FAIL line per problem. --every S repeats the check "
    "and prints one line per run, for a process manager's log."
)

SERVICE_NAME = "convlog-log"
CONSUMER_PREFIX = "convlog-agent-"


@dataclass
class Report:
    """What one health check found."""

    ok: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        return [f"ok    {m}" for m in self.ok] + [f"FAIL  {m}" for m in self.problems]


async def _stats(nc: Any, prefix: str, timeout: float) -> list[dict[str, Any]]:  # noqa: ASYNC109
    """Every log-service instance's ``$SRV.STATS`` reply for ``prefix``."""
    replies: list[dict[str, Any]] = []
    first = asyncio.Event()

    async def on_reply(msg: Any) -> None:
        with contextlib.suppress(ValueError):
            stats = json.loads(msg.data)
            if (stats.get("metadata") or {}).get("prefix", "convlog") == prefix:
                replies.append(stats)
                first.set()

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=on_reply)
    try:
        await nc.publish(f"$SRV.STATS.{SERVICE_NAME}", b"", reply=inbox)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await first.wait()
            await asyncio.sleep(0.3)  # the other instances
    finally:
        await sub.unsubscribe()
    return replies


def _denied(denied: list[str], subject: str) -> str | None:
    """The problem line for ``subject`` when the server refused this user to publish
    there (a permissions violation, so no answer came: not the service's fault)."""
    from shared.failures import refused_publish

    refusal = next((e for e in denied if refused_publish(e) == subject.lower()), None)
    if refusal is None:
        return None
    return (f"NATS does not let this user publish to {subject} ({refusal}): run `convlog health` "
            "as a user that may (deploy/nats/auth.conf, nats-users.conf: the log user)")


def _lost(nc: Any, e: BaseException) -> None:
    """Raise ``ConnectionClosedError`` when ``e`` came from the server going away.

    With no reconnects here, a request awaited when the connection closed fails with
    whatever it was waiting on (a timeout, 'connection closed'): the step would blame
    the log service or JetStream for it; :func:`check` names the lost connection.
    """
    import nats.errors

    if nc.is_closed:
        raise nats.errors.ConnectionClosedError from e


async def _check_log(nc: Any, settings: Settings, report: Report, *, max_lag: float,
                     timeout: float, denied: list[str]) -> None:  # noqa: ASYNC109
    from shared.client import LogClient

    instances = await _stats(nc, settings.prefix, timeout)
    if not instances:
        refused = _denied(denied, f"$SRV.STATS.{SERVICE_NAME}")
        report.problems.append(f"log service: {refused}" if refused else
                               f"log service: no instance answers $SRV.STATS.{SERVICE_NAME} "
                               f"for prefix {settings.prefix!r} (is `convlog log` running?)")
        return
    client = LogClient(nc, prefix=settings.prefix, timeout=timeout, deadline=timeout)
    started = time.monotonic()
    try:
        await client.last_order("convlog-health-probe")
    except Exception as e:
        _lost(nc, e)
        refused = _denied(denied, client.subjects.read("convlog-health-probe"))
        report.problems.append(f"log service: {refused}" if refused else
                               f"log service: a read was not answered within {timeout:g}s ({e})")
    else:
        report.ok.append(f"log service: {len(instances)} instance(s) answer; a read took "
                         f"{(time.monotonic() - started) * 1000:.0f} ms")
    for stats in instances:
        data = next((ep.get("data") for ep in stats.get("endpoints") or []
                     if ep.get("name") == "append"), None) or {}
        if "fanout_lag_seconds" not in data:
            report.problems.append(f"log service {stats.get('id')}: reports no fan-out lag "
                                   f"(version {stats.get('version')}?)")
            continue
        lag, items = float(data["fanout_lag_seconds"]), int(data["fanout_lag_items"])
        where = f"log service {stats.get('id')}"
        if lag > max_lag:
            report.problems.append(f"{where}: the fan-out is {items} items / {lag:.1f}s behind the "
                                   f"log (max {max_lag:g}s): items are not reaching "
                                   f"{settings.subjects.items_all}")
        else:
            report.ok.append(f"{where}: fan-out current ({items} items, {lag:.2f}s behind)")


async def _check_consumers(nc: Any, settings: Settings, report: Report, *, agents: list[str],
                           window: float, denied: list[str]) -> None:
    import nats.js.errors

    from shared.work import work_stream_name

    js = nc.jetstream(timeout=window + 2)
    stream = work_stream_name(settings.subjects)
    try:
        first = {c.name: c for c in await js.consumers_info(stream)
                 if c.name.startswith(CONSUMER_PREFIX)}
    except nats.js.errors.NotFoundError:
        report.problems.append(f"work stream {stream} does not exist (has the log service ever run?)")
        return
    except Exception as e:  # JetStream unavailable (no quorum, no leader), a timeout
        _lost(nc, e)
        refused = _denied(denied, f"$JS.API.CONSUMER.LIST.{stream}")
        report.problems.append(f"work stream {stream}: {refused}" if refused else
                               f"work stream {stream}: cannot list its consumers "
                               f"({str(e) or type(e).__name__}): is JetStream available?")
        return
    for agent in agents:
        if CONSUMER_PREFIX + agent not in first:
            report.problems.append(f"agent {agent}: no consumer {CONSUMER_PREFIX}{agent} "
                                   "(no worker of it has started)")
    if not first:
        return
    # Watch each consumer for the window: delivered or acked something, or was pulled from.
    progress = {name: False for name in first}
    pulled = dict.fromkeys(first, False)
    latest = dict(first)
    deadline = time.monotonic() + window
    while True:
        for name, c0 in first.items():
            c = latest[name]
            if (c.delivered.stream_seq or 0) > (c0.delivered.stream_seq or 0) or \
                    (c.ack_floor.stream_seq or 0) > (c0.ack_floor.stream_seq or 0) or \
                    not c.num_pending:  # nothing waits: in-flight notices are a worker's turns
                progress[name] = True
            pulled[name] = pulled[name] or bool(c.num_waiting)
        done = all(progress[n] and (pulled[n] or latest[n].num_ack_pending) for n in first)
        if done or time.monotonic() >= deadline:
            break
        await asyncio.sleep(0.25)
        # All at once, and none past the window (and a second): asked one by one, each
        # waiting up to window + 2 s on a JetStream that stopped answering, one run took
        # that many times the agents, past the timer unit's limit, with no verdict.
        wait = max(0.1, deadline - time.monotonic()) + 1
        answers = await asyncio.gather(*(js.consumer_info(stream, name, timeout=wait) for name in first),
                                       return_exceptions=True)
        # The server went away (no reconnects here): the watch would end on its first
        # snapshot and blame the agents with notices waiting; the check names the loss.
        _lost(nc, None)
        for name, info in zip(first, answers, strict=True):
            if not isinstance(info, BaseException):
                latest[name] = info
    for name, c in latest.items():
        agent = name[len(CONSUMER_PREFIX):]
        gone = bool(agents) and agent not in agents  # a consumer the spec has no agent for
        if not progress[name]:
            report.problems.append(
                f"agent {agent}: consumer {name} has {c.num_pending} turn notices waiting and "
                f"{c.num_ack_pending} unacked, and delivered or acked none in {window:g}s "
                + (f"({agent} is not in the agents spec)" if gone else f"(is a worker for {agent} running?)"))
        elif gone and not c.num_pending and not c.num_ack_pending:
            # An agent removed from the spec keeps its durable consumer: nothing waits
            # on it, so nothing is lost, and no worker of it is expected.
            report.ok.append(f"agent {agent}: not in the agents spec; its consumer {name} is idle "
                             "(delete it once the agent is gone for good)")
        elif not pulled[name] and not c.num_ack_pending:
            report.problems.append(f"agent {agent}: no worker is pulling from consumer {name} "
                                   f"(none asked for notices in {window:g}s)")
        else:
            report.ok.append(f"agent {agent}: consumer draining ({c.num_pending} waiting, "
                             f"{c.num_ack_pending} in flight)")


async def check(settings: Settings, *, agents: list[str], max_lag: float = 10.0,
                window: float = 2.0, timeout: float = 2.0) -> Report:  # noqa: ASYNC109
    """Run every check once (see the module docstring)."""
    import nats.errors

    from shared.client import connect_options
    from shared.config import ConfigError
    from shared.nats_connect import connect
    from shared.nats_seam import bind

    report = Report()
    from shared.failures import refused_publish

    denied: list[str] = []  # the server's permissions violations: a check this user may not make

    async def quiet(e: Exception) -> None:
        if refused_publish(e) is not None:
            denied.append(str(e))  # else reported below, once

    options = {**connect_options(settings, name="convlog-health"), "connect_timeout": timeout,
               "allow_reconnect": False, "max_reconnect_attempts": 1, "error_cb": quiet}
    # One server at a time, in the order given: with reconnects off, nats-py gives up on
    # the first server it picks when that one accepts the connection but does not answer
    # (a hung node of a cluster), though the next would have.
    for i, server in enumerate(options["servers"]):
        try:
            async with asyncio.timeout(timeout + 1):
                nc = await connect(settings, {**options, "servers": [server]})
            bind(nc, settings.nats_seam)  # CONVLOG_NATS_SEAM, as every other connection of convlog
            break
        except ConfigError as e:  # a server answered, and refused the credentials
            report.problems.append(f"NATS at {settings.nats_url}: {e}")
            return report
        except Exception as e:
            if i + 1 < len(options["servers"]):
                continue
            report.problems.append(f"NATS: no server answers at {settings.nats_url} "
                                   f"({str(e) or type(e).__name__})")
            return report
    try:
        report.ok.append(f"NATS: connected to {settings.nats_url}")
        await _check_log(nc, settings, report, max_lag=max_lag, timeout=timeout, denied=denied)
        await _check_consumers(nc, settings, report, agents=agents, window=window, denied=denied)
    except nats.errors.Error as e:  # the server went away during the check (no reconnects here)
        report.problems.append(f"NATS: the connection to {settings.nats_url} was lost during the "
                               f"check ({str(e) or type(e).__name__})")
    finally:
        with contextlib.suppress(Exception):
            await nc.close()
    return report


def _agents(path: str | Path | None) -> list[str]:
    if path is None:
        return []
    from services.worker.spec import load_spec

    return list(load_spec(Path(path)).agents)


async def cmd_health(args: argparse.Namespace, settings: Settings) -> int:
    from services.worker.spec import SpecError

    try:
        agents = _agents(args.agents or settings.agents)
    except (SpecError, OSError) as e:
        print(f"convlog health: bad agent spec: {e}", file=sys.stderr)
        return 2
    wait = args.wait
    give_up = time.monotonic() + (wait or 0.0)
    waited = False
    while True:
        report = await check(settings, agents=agents, max_lag=args.max_lag, window=args.window,
                             timeout=args.timeout)
        if wait is not None and not report.healthy and time.monotonic() < give_up:
            # With --every, nothing until the first verdict: a watcher started with the
            # stack (deploy/supervisord.conf) would log its start as a problem.
            if not waited and args.every is None:
                print(f"convlog health: waiting up to {args.wait:g}s: " + "; ".join(report.problems),
                      file=sys.stderr, flush=True)
                waited = True
            await asyncio.sleep(0.5)  # a stack still starting: look again
            continue
        if args.every is None:
            for line in report.lines():
                print(line, flush=True)
            return 0 if report.healthy else 1
        wait = None  # --wait is for the first run only: later ones report what they find
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        verdict = "healthy" if report.healthy else "UNHEALTHY: " + "; ".join(report.problems)
        print(f"{stamp} {verdict}", flush=True)
        await asyncio.sleep(args.every)


def health_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--agents", help="agents TOML: each of its agents must have a consumer "
                   "[CONVLOG_AGENTS; default: check the consumers that exist]")
    p.add_argument("--max-lag", type=positive_float, default=10.0, metavar="S",
                   help="most seconds the items subjects may be behind the log (default 10)")
    p.add_argument("--window", type=positive_float, default=2.0, metavar="S",
                   help="seconds to watch each consumer drain (default 2)")
    p.add_argument("--timeout", type=positive_float, default=2.0, metavar="S",
                   help="seconds to wait for NATS and the log service (default 2)")
    p.add_argument("--every", type=positive_float, default=None, metavar="S",
                   help="repeat every S seconds, one line per run, never exit")
    p.add_argument("--wait", type=positive_float, default=None, metavar="S",
                   help="check again until healthy, for at most S seconds (after starting a stack); "
                   "with --every, the first run only")
