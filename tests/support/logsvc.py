"""The log service and load writers as real subprocesses, plus end-state checks.

Used by the fault and property tests::

    svc = LogServiceProc(nats_server.url, db_path, log_dir=tmp_path).start()
    svc.kill9(); svc.start()            # a crash and a restart on the same file
    ...
    svc.stop()                          # always, in ``finally`` (fixtures do it)

Every process is started with :data:`sys.executable` from the checkout root,
talks to 127.0.0.1 only, and is stopped by its own PID.  The checks read the
log through :class:`~shared.client.LogClient` and the items stream through
JetStream (``get_msg`` by sequence), never through a core subscription on a
captured subject.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client

from shared.chain import verify
from shared.client import LogClient
from shared.codec import decode
from shared.messages import Envelope
from shared.subjects import Subjects

from .eventually import assert_eventually
from .procs import Proc, ProcError

__all__ = [
    "READY_LINE",
    "Acks",
    "ack_count",
    "LogServiceProc",
    "check_session",
    "following",
    "log_services",
    "read_acks",
    "read_stream",
    "release_together",
    "service_env",
    "start_writers",
    "stream_matches_log",
    "wait_for_acks",
    "writer_proc",
    "writer_procs",
]

READY_LINE = r"log service ready"
SUBJECTS = Subjects("convlog")


def service_env(data_dir: str | os.PathLike[str]) -> dict[str, str]:
    """Our environment minus any ``CONVLOG_*`` (a developer's settings must not leak in)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVLOG_")}
    env["CONVLOG_DATA_DIR"] = str(data_dir)
    env["CONVLOG_EMBEDDED"] = "false"
    env["PYTHONUNBUFFERED"] = "1"
    return env


class LogServiceProc:
    """``python -m services.cli.main log --nats-url URL --db PATH --no-embedded``.

    Each :meth:`start` launches a new process on the same database file (its
    log file is numbered), so crash/restart cycles are ``kill9()`` + ``start()``.
    """

    def __init__(
        self, nats_url: str, db: str | os.PathLike[str], *, log_dir: str | os.PathLike[str], store: str = "sqlite",
        env: Mapping[str, str] | None = None, name: str = "log-service",
    ) -> None:
        self.store = store
        self.extra_env = dict(env or {})  # CONVLOG_* settings on top of service_env()
        self.name = name
        self.nats_url = nats_url
        self.db = Path(db)
        self.log_dir = Path(log_dir)
        self.proc: Proc | None = None
        self.starts = 0
        self._paused = False

    def start(self, timeout: float = 20.0, *, wait: bool = True) -> LogServiceProc:
        """Start a new process and wait for its ready line (unless ``wait`` is false).

        Raises:
            ProcError: it exited or did not become ready (the message has its output).
        """
        if self.proc is not None and self.proc.running:
            raise ProcError(f"log service already running (pid {self.proc.pid})")
        self.starts += 1
        self.proc = Proc(
            [sys.executable, "-m", "services.cli.main", "log", "--nats-url", self.nats_url,
             "--db", str(self.db), "--no-embedded", "--store", self.store],
            log_dir=self.log_dir, env={**service_env(self.log_dir / "convlog-data"), **self.extra_env},
            name=f"{self.name}-{self.starts}",
        ).start()
        self._paused = False
        if not wait:
            return self
        try:
            self.proc.wait_for_line(READY_LINE, timeout=timeout)
        except BaseException:
            self.proc.kill9()
            raise
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None, "log service not started"
        return self.proc.pid

    def kill9(self) -> None:
        """SIGKILL the running process (a crash) and reap it."""
        if self.proc is not None:
            self.proc.kill9()
        self._paused = False

    def pause(self) -> None:
        """SIGSTOP: the process keeps its connections but answers nothing."""
        if self.proc is not None and self.proc.running and not self._paused:
            os.kill(self.proc.pid, signal.SIGSTOP)
            self._paused = True

    def resume(self) -> None:
        """SIGCONT a paused process."""
        if self.proc is not None and self._paused:
            if self.proc.running:
                os.kill(self.proc.pid, signal.SIGCONT)
            self._paused = False

    def stop(self, timeout: float = 10.0) -> int | None:
        """Graceful stop (SIGTERM, wait, then SIGKILL), by PID. Idempotent."""
        if self.proc is None:
            return None
        self.resume()  # a stopped process would not act on SIGTERM
        return self.proc.terminate(timeout)

    def output(self) -> str:
        return self.proc.output() if self.proc is not None else ""


def writer_proc(
    nats_url: str,
    *,
    name: str,
    sessions: Iterable[str],
    out: str | os.PathLike[str],
    log_dir: str | os.PathLike[str],
    count: int = 0,
    batch_every: int = 0,
    pace: float = 0.0,
    stop_file: str | os.PathLike[str] | None = None,
    go_file: str | os.PathLike[str] | None = None,
    max_seconds: float = 60.0,
    timeout: float = 2.0,
    deadline: float = 30.0,
    cas: bool = False,
    concurrency: int = 1,
    attempts: int = 3,
) -> Proc:
    """A (not started) ``tests.support.writer`` process; see that module for the flags."""
    args = [
        sys.executable, "-m", "tests.support.writer", "--url", nats_url, "--name", name,
        "--sessions", ",".join(sessions), "--out", str(out), "--count", str(count),
        "--batch-every", str(batch_every), "--pace", str(pace),
        "--max-seconds", str(max_seconds), "--timeout", str(timeout), "--deadline", str(deadline),
        "--concurrency", str(concurrency), "--attempts", str(attempts),
    ]
    if stop_file is not None:
        args += ["--stop-file", str(stop_file)]
    if go_file is not None:
        args += ["--go-file", str(go_file)]
    if cas:
        args.append("--cas")
    return Proc(args, log_dir=log_dir, env=service_env(Path(log_dir) / "convlog-data"), name=name)


@dataclass
class Acks:
    """What one or more writers recorded: every acknowledged append."""

    # (session_id, item_ids, orders) per acknowledged request, in ack order
    appends: list[tuple[str, list[str], list[int]]] = field(default_factory=list)
    unknown: list[tuple[str, list[str]]] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)  # the raw ack lines
    done: int = 0  # writers that wrote their final summary line
    conflicts: int = 0  # expected_last conflicts the writers saw (``--cas``)

    @property
    def by_item(self) -> dict[tuple[str, str], int]:
        """(session_id, item_id) -> acknowledged item_order."""
        return {
            (sid, iid): order
            for sid, ids, orders in self.appends
            for iid, order in zip(ids, orders, strict=True)
        }

    @property
    def items(self) -> int:
        return sum(len(ids) for _, ids, _ in self.appends)

    @property
    def hashes(self) -> dict[tuple[str, str], str]:
        """(session_id, item_id) -> acknowledged hash (writers that record hashes)."""
        return {
            (r["sid"], iid): h
            for r in self.records if "hashes" in r
            for iid, h in zip(r["ids"], r["hashes"], strict=True)
        }

    @property
    def times(self) -> list[tuple[float, str]]:
        """(wall-clock time, writer) of every acknowledged append that recorded one, sorted."""
        return sorted((r["t"], r.get("w", "")) for r in self.records if "t" in r)


def read_acks(paths: Iterable[str | os.PathLike[str]]) -> Acks:
    """Parse the JSONL ack files written by ``tests.support.writer``."""
    acks = Acks()
    for path in paths:
        p = Path(path)
        if not p.exists():
            continue
        for line in p.read_text().splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            if "summary" in rec:
                acks.done += 1
                acks.conflicts += rec["summary"].get("conflicts", 0)
                acks.unknown += [(u["sid"], u["ids"]) for u in rec["summary"]["unknown"]]
            else:
                acks.appends.append((rec["sid"], rec["ids"], rec["orders"]))
                acks.records.append(rec)
    return acks


def ack_count(paths: Iterable[str | os.PathLike[str]]) -> int:
    """How many appends the writers have acknowledged so far (cheap progress probe)."""
    total = 0
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            total += sum(1 for line in Path(path).read_text().splitlines() if line.startswith('{"sid"'))
    return total


async def wait_for_acks(
    paths: Iterable[str | os.PathLike[str]], more: int, timeout: float = 20.0  # noqa: ASYNC109
) -> int:
    """Wait until the writers acknowledged ``more`` appends beyond now; return the new total."""
    paths = list(paths)
    base = ack_count(paths)

    def grew() -> int:
        n = ack_count(paths)
        assert n >= base + more, f"only {n - base} of {more} new acks"
        return n

    return await assert_eventually(grew, timeout=timeout, interval=0.05)


def check_session(
    session_id: str, envelopes: list[Envelope], acked: Mapping[tuple[str, str], int],
    hashes: Mapping[tuple[str, str], str] | None = None,
) -> None:
    """Assert the log of one session is whole: orders 1..n, ids unique, chain valid,
    and every acknowledged item at its acknowledged order (with its acknowledged
    hash, for the items in ``hashes``)."""
    orders = [e.item_order for e in envelopes]
    assert orders == list(range(1, len(envelopes) + 1)), f"{session_id}: orders not 1..n"
    ids = [e.item_id for e in envelopes]
    assert len(set(ids)) == len(ids), f"{session_id}: duplicate item_ids in the log"
    problem = verify(envelopes, session_id=session_id)
    assert problem is None, f"{session_id}: chain does not verify: {problem}"
    at = {e.item_id: e.item_order for e in envelopes}
    for (sid, iid), order in acked.items():
        if sid == session_id:
            assert at.get(iid) == order, f"{sid}: acked {iid} at {order}, log has {at.get(iid)}"
    hash_of = {e.item_id: e.hash for e in envelopes}
    for (sid, iid), h in (hashes or {}).items():
        if sid == session_id:
            assert hash_of.get(iid) == h, f"{sid}: acked {iid} with hash {h}, log has {hash_of.get(iid)}"


@contextlib.asynccontextmanager
async def following(
    client: LogClient, session_id: str, *, after: int = 0
) -> AsyncIterator[list[Envelope]]:
    """Run ``client.follow(session_id)`` in a task for the block; yields the list it fills."""
    seen: list[Envelope] = []

    async def consume() -> None:
        async for env in client.follow(session_id, after=after, idle_check=1.0):
            seen.append(env)

    task = asyncio.create_task(consume(), name=f"follow-{session_id}")
    try:
        yield seen
    finally:
        # Bounded: a follower that ignores cancellation fails the test, never hangs it.
        for _ in range(3):
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=5)
            if done:
                break
        else:
            raise AssertionError(f"the follower of {session_id} ignored 3 cancellations")
        if not task.cancelled() and task.exception() is not None:
            raise AssertionError(f"the follower of {session_id} died") from task.exception()


async def read_stream(nc: Client, stream: str = SUBJECTS.stream_name) -> list[tuple[str, str, bytes]]:
    """Every message in the items stream as (subject, Nats-Msg-Id, data), in stream order."""
    js = nc.jetstream(timeout=5)
    info = await js.stream_info(stream)
    out: list[tuple[str, str, bytes]] = []
    if info.state.messages == 0:
        return out
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await js.get_msg(stream, seq=seq, direct=True)
        out.append((msg.subject, (msg.headers or {}).get("Nats-Msg-Id", ""), msg.data or b""))
    return out


async def stream_matches_log(nc: Client, client: LogClient, sessions: Iterable[str]) -> None:
    """Assert the items stream holds exactly the log: each committed envelope once, in
    ``item_order``, with ``Nats-Msg-Id: <sid>:<order>``, byte-identical, and nothing else.

    Meant for ``assert_eventually``: the outbox publishes asynchronously.
    """
    msgs = await read_stream(nc)
    per: dict[str, list[tuple[str, bytes]]] = {}
    for subject, msg_id, data in msgs:
        sid = subject.rpartition(".")[2]
        per.setdefault(sid, []).append((msg_id, data))
    total = 0
    for sid in sessions:
        log_envs = await client.items(sid)
        total += len(log_envs)
        got = per.get(sid, [])
        ids = [m for m, _ in got]
        assert len(ids) == len(set(ids)), f"{sid}: a message id is in the stream twice"
        assert ids == [f"{sid}:{e.item_order}" for e in log_envs], (
            f"{sid}: stream has {len(ids)} msgs, log {len(log_envs)}; "
            f"first difference at {_first_diff(ids, [f'{sid}:{e.item_order}' for e in log_envs])}"
        )
        assert [decode(d, Envelope) for _, d in got] == log_envs, f"{sid}: envelopes differ"
    assert len(msgs) == total, f"stream holds {len(msgs)} messages, the logs {total}"


def _first_diff(a: list[str], b: list[str]) -> str:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return f"index {i}: stream {x!r} vs log {y!r}"
    return f"index {min(len(a), len(b))} (one is a prefix of the other)"


# -- fixtures (re-exported by the fault and property conftests) ----------------


@pytest.fixture
def log_services(tmp_path: Path) -> Iterator[Callable[..., LogServiceProc]]:
    """Start log services: ``log_services(nats_url, db)`` -> a started :class:`LogServiceProc`.

    Every one is stopped by PID in teardown (resumed first if paused).
    """
    started: list[LogServiceProc] = []

    def factory(nats_url: str, db: str | os.PathLike[str]) -> LogServiceProc:
        svc = LogServiceProc(nats_url, db, log_dir=tmp_path)
        started.append(svc)
        return svc.start()

    try:
        yield factory
    finally:
        for svc in started:
            svc.stop()


@pytest.fixture
def writer_procs(tmp_path: Path) -> Iterator[Callable[..., tuple[Proc, Path]]]:
    """Start writers: ``writer_procs(nats_url, name=..., sessions=[...], **flags)`` ->
    (started :class:`Proc`, its JSONL ack file).  All are stopped by PID in teardown."""
    started: list[Proc] = []

    def factory(nats_url: str, *, name: str, **kwargs: object) -> tuple[Proc, Path]:
        out = tmp_path / f"acks-{name}.jsonl"
        proc = writer_proc(nats_url, name=name, out=out, log_dir=tmp_path, **kwargs)  # type: ignore[arg-type]
        started.append(proc)
        return proc.start(), out

    try:
        yield factory
    finally:
        for proc in started:
            proc.terminate()


def start_writers(
    writer_procs: Callable[..., tuple[Proc, Path]], nats_url: str, n: int, *, prefix: str = "w", **flags: Any
) -> list[tuple[Proc, Path]]:
    """``n`` writers named ``<prefix>0``, ``<prefix>1``, ... with the same ``flags``."""
    return [writer_procs(nats_url, name=f"{prefix}{i}", **flags) for i in range(n)]


async def release_together(writers: Iterable[tuple[Proc, Path]], go: Path, timeout: float = 60) -> None:  # noqa: ASYNC109
    """Wait until every writer (started with ``go_file=go``) is connected, let
    them all go at once, and wait for each to exit 0."""
    procs = [proc for proc, _ in writers]
    for proc in procs:
        await asyncio.to_thread(proc.wait_for_line, "connected", 20)
    await asyncio.to_thread(go.touch)
    for proc in procs:
        assert await asyncio.to_thread(proc.wait, timeout) == 0, proc.output()

