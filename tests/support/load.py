"""Load writers as real subprocesses (``tests.support.writer``) and what they acknowledged.

Used by the fault and property tests::

    writers = start_writers(writer_procs, nats_server.url, 3, sessions=["s1"], stop_file=stop)
    await wait_for_acks([out for _, out in writers], more=40)
    acks = read_acks(out for _, out in writers)

Every writer is started with :data:`sys.executable` from the checkout root and
stopped by its own PID (the :func:`writer_procs` fixture does it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from .eventually import assert_eventually
from .procs import Proc, service_env

__all__ = [
    "Acks",
    "ack_count",
    "read_acks",
    "release_together",
    "start_writers",
    "wait_for_acks",
    "writer_proc",
    "writer_procs",
]


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
