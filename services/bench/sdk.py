"""``convlog bench --sdk``: ``ConvlogSession`` side by side with the Agents SDK's ``SQLiteSession``.

One run measures both stores on the same machine with the same items:

* ``add_items`` throughput with 1 writer and with 16 concurrent writers (16
  session objects on one session id in one process);
* ``get_items(limit=50)`` throughput with 1 and with 16 concurrent readers;
* one session id written by 4 OS processes at once (each call adds a
  user/assistant pair), then read back and checked: items lost or doubled,
  a process's items out of its own order, pairs torn apart, calls that failed.

``SQLiteSession`` is file-backed in a temporary directory (the SDK's own
multi-process story); ``ConvlogSession`` goes over NATS to a log service that
commits durably to SQLite and hash-chains every item.  Ratios are
ConvlogSession / SQLiteSession throughput, so above 1 means convlog is faster.

With no URL, the bench starts its own embedded nats-server (port picked by the
server) and a ``convlog log`` subprocess on a temporary database, and stops
both afterwards.  Run it as ``python -m services.bench.sdk [--url URL]
[--ops N]``.  The four writer processes are this module too (``--worker``);
they start first, so their imports overlap the stack's start-up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from shared.agents_session import ConvlogSession, require_agents_sdk
from shared.client import LogClient

__all__ = ["Measure", "Mixing", "main", "run_sdk_bench"]

WRITERS = 16
PROCESSES = 4
READ_LIMIT = 50
_ITEM_TEXT = "I was charged twice for my subscription this month, can you refund one? " * 2


@dataclass
class Measure:
    """Completed calls of one scenario, their wall time and per-call latencies (s)."""

    calls: int
    seconds: float
    latencies: list[float] = field(default_factory=list)
    errors: int = 0

    @property
    def rate(self) -> float:
        return self.calls / self.seconds if self.seconds > 0 else 0.0

    def pct_ms(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000


@dataclass
class Mixing:
    """What reading back a multi-process session found."""

    expected: int
    found: int
    lost: int
    doubled: int
    out_of_order: int
    torn: int
    failed_calls: int
    calls: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.calls / self.seconds if self.seconds > 0 else 0.0


def _item(tag: str, n: int, role: str = "user") -> dict[str, Any]:
    if role == "user":
        return {"role": "user", "content": f"[{tag} {n}] {_ITEM_TEXT}"}
    return {
        "type": "message",
        "role": "assistant",
        "content": [{"type": "output_text", "text": f"[{tag} {n}] noted", "annotations": []}],
    }


# -- stores ---------------------------------------------------------------------


class _Store:
    """Makes sessions of one kind; every session made is closed by :meth:`close`."""

    name = ""

    def __init__(self) -> None:
        self.sessions: list[Any] = []

    def session(self, sid: str) -> Any:
        raise NotImplementedError

    async def close(self) -> None:
        for s in self.sessions:
            result = s.close()
            if asyncio.iscoroutine(result):
                await result
        self.sessions.clear()


class _SQLiteStore(_Store):
    name = "SQLiteSession"

    def __init__(self, db_path: Path) -> None:
        super().__init__()
        self.db_path = db_path

    def session(self, sid: str) -> Any:
        from agents import SQLiteSession

        s = SQLiteSession(sid, self.db_path)
        self.sessions.append(s)
        return s


class _ConvlogStore(_Store):
    name = "ConvlogSession"

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url

    def session(self, sid: str) -> Any:
        s = ConvlogSession.from_url(sid, url=self.url, agent="bench")
        self.sessions.append(s)
        return s


# -- measurements -------------------------------------------------------------


async def _timed(workers: int, calls_each: int, op: Callable[[int, int], Awaitable[Any]]) -> Measure:
    """Run ``workers`` concurrent loops of ``calls_each`` calls of ``op(worker, i)``."""
    latencies: list[float] = []
    errors = 0

    async def loop(w: int) -> None:
        nonlocal errors
        for i in range(calls_each):
            t0 = time.perf_counter()
            try:
                await op(w, i)
            except Exception:
                errors += 1
                continue
            latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    await asyncio.gather(*(loop(w) for w in range(workers)))
    return Measure(calls=len(latencies), seconds=time.perf_counter() - start,
                   latencies=latencies, errors=errors)


async def _in_process(store: _Store, ops: int, run_id: str) -> dict[str, Measure]:
    """add_items and get_items throughput, 1 and 16 at a time, on one store."""
    out: dict[str, Measure] = {}
    one = store.session(f"{run_id}-one")
    await one.get_items(limit=1)  # connect / open before the clock starts
    out["add_1"] = await _timed(1, ops, lambda w, i: one.add_items([_item("w0", i)]))
    many = [store.session(f"{run_id}-many") for _ in range(WRITERS)]
    for s in many:
        await s.get_items(limit=1)
    per = max(1, ops // WRITERS)
    out["add_16"] = await _timed(WRITERS, per, lambda w, i: many[w].add_items([_item(f"w{w}", i)]))
    out["get_1"] = await _timed(1, ops, lambda w, i: one.get_items(limit=READ_LIMIT))
    out["get_16"] = await _timed(WRITERS, per, lambda w, i: many[w].get_items(limit=READ_LIMIT))
    return out


class _Workers:
    """Four worker processes (this module with ``--worker``), started once for the run.

    Importing the SDK costs each interpreter seconds of CPU, so the workers
    start before anything is measured and serve both stores in turn.  They
    talk JSON lines: the parent sends ``{"kind", "target", "sid", "count"}``,
    each worker opens its session and answers ``{"armed": tag}``; then
    ``"go"`` to all of them at once, and each answers with its summary.
    """

    def __init__(self) -> None:
        self.tags = [f"p{n}" for n in range(1, PROCESSES + 1)]
        self.procs: list[asyncio.subprocess.Process] = []

    async def start(self) -> None:
        for tag in self.tags:
            self.procs.append(await asyncio.create_subprocess_exec(
                sys.executable, "-m", "services.bench.sdk", "--worker", tag,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            ))

    async def _send(self, line: str) -> None:
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write(line.encode() + b"\n")
            await proc.stdin.drain()

    async def _answers(self, timeout: float) -> list[dict[str, Any]]:  # noqa: ASYNC109
        out = []
        async with asyncio.timeout(timeout):
            for proc in self.procs:
                assert proc.stdout is not None
                line = await proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"sdk bench worker exited with {await proc.wait()}")
                answer = json.loads(line)
                if "fatal" in answer:
                    raise RuntimeError(f"sdk bench worker failed: {answer['fatal']}")
                out.append(answer)
        return out

    async def run_ready(self) -> None:
        """Wait until every worker has imported what it needs."""
        await self._answers(120)

    async def run(self, kind: str, target: str, sid: str, count: int) -> list[dict[str, Any]]:
        await self._send(json.dumps({"kind": kind, "target": target, "sid": sid, "count": count}))
        await self._answers(60)  # every worker has its session open
        await self._send("go")  # ... and all start at once
        return await self._answers(300)

    async def stop(self) -> None:
        for proc in self.procs:
            if proc.stdin is not None and not proc.stdin.is_closing():
                proc.stdin.close()
        for proc in self.procs:
            try:
                async with asyncio.timeout(10):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def _processes(workers: _Workers, kind: str, target: str, sid: str, calls_each: int) -> Mixing:
    """The workers add pairs to one session at once; read it back and check."""
    summaries = await workers.run(kind, target, sid, calls_each)
    failed = sum(x["errors"] for x in summaries)
    calls = sum(x["calls"] for x in summaries)
    seconds = max(x["seconds"] for x in summaries)  # they start together: the slowest is the wall time
    store: _Store = _SQLiteStore(Path(target)) if kind == "sqlite" else _ConvlogStore(target)
    try:
        items = await store.session(sid).get_items()
    finally:
        await store.close()
    return _check_mixing(items, workers.tags, calls_each, failed, calls, seconds)


def _check_mixing(
    items: list[dict[str, Any]], tags: list[str], calls_each: int, failed: int, calls: int,
    seconds: float,
) -> Mixing:
    marks: list[tuple[str, int, str]] = []
    for item in items:
        content = item.get("content")
        body = content if isinstance(content, str) else content[0]["text"]
        tag, n = body[1:].split("]", 1)[0].split()
        marks.append((tag, int(n), item.get("role", "")))
    expected = {(t, n, r) for t in tags for n in range(calls_each) for r in ("user", "assistant")}
    seen: dict[tuple[str, int, str], int] = {}
    for m in marks:
        seen[m] = seen.get(m, 0) + 1
    lost = len(expected - seen.keys())
    doubled = sum(c - 1 for c in seen.values() if c > 1)
    out_of_order = 0
    last: dict[str, int] = {}
    for tag, n, role in marks:
        if role == "user":
            if n < last.get(tag, -1):
                out_of_order += 1
            last[tag] = max(n, last.get(tag, -1))
    torn = sum(
        1 for i, (tag, n, role) in enumerate(marks)
        if role == "user" and (i + 1 >= len(marks) or marks[i + 1] != (tag, n, "assistant"))
    )
    return Mixing(expected=len(expected), found=len(marks), lost=lost, doubled=doubled,
                  out_of_order=out_of_order, torn=torn, failed_calls=failed, calls=calls,
                  seconds=seconds)


# -- the stack ----------------------------------------------------------------


@contextlib.asynccontextmanager
async def _local_stack(base: Path) -> AsyncIterator[str]:
    """An embedded nats-server and a ``convlog log`` subprocess; yields the NATS URL."""
    from services.cli.stack import EmbeddedNats, stop_process

    nats_server = EmbeddedNats(base / "nats", port=-1).start()
    log_proc = await asyncio.to_thread(
        subprocess.Popen,
        [sys.executable, "-m", "services.cli.main", "log", "--nats-url", nats_server.url,
         "--db", str(base / "convlog.db"), "--no-embedded", "--log-level", "WARNING"],
        stdin=subprocess.DEVNULL,
    )
    try:
        await _wait_for_log_service(nats_server.url)
        yield nats_server.url
    finally:
        await asyncio.to_thread(stop_process, log_proc)
        nats_server.stop()


async def _wait_for_log_service(url: str, timeout: float = 20.0) -> None:  # noqa: ASYNC109
    client = await LogClient.connect(url)
    client.deadline = 0.5
    try:
        end = time.monotonic() + timeout
        while True:
            try:
                await client.read("sdk-bench-ready", tail=0)
                return
            except Exception:
                if time.monotonic() > end:
                    raise
                await asyncio.sleep(0.1)
    finally:
        await client.close()


# -- the report -----------------------------------------------------------------


def _ratio(convlog: float, sqlite: float) -> str:
    return f"{convlog / sqlite:.2f}x" if sqlite > 0 else "n/a"


def _report(results: dict[str, Any], out: TextIO) -> None:
    sq, cv = results["sqlite"], results["convlog"]
    rows: list[tuple[str, str, str, str]] = []
    labels = {
        "add_1": "add_items, 1 writer",
        "add_16": f"add_items, {WRITERS} writers",
        "get_1": f"get_items(limit={READ_LIMIT}), 1 reader",
        "get_16": f"get_items(limit={READ_LIMIT}), {WRITERS} readers",
    }
    for key, label in labels.items():
        a, b = sq[key], cv[key]
        rows.append((label + " (calls/s)", f"{a.rate:,.0f}", f"{b.rate:,.0f}", _ratio(b.rate, a.rate)))
        rows.append(("  latency p50 / p99 (ms)", f"{a.pct_ms(0.5):.2f} / {a.pct_ms(0.99):.2f}",
                     f"{b.pct_ms(0.5):.2f} / {b.pct_ms(0.99):.2f}", ""))
        if a.errors or b.errors:
            rows.append(("  failed calls", str(a.errors), str(b.errors), ""))
    a, b = sq["processes"], cv["processes"]
    rows.append((f"add_items, {PROCESSES} processes (calls/s)", f"{a.rate:,.0f}", f"{b.rate:,.0f}",
                 _ratio(b.rate, a.rate)))
    rows.append(("  items found / expected", f"{a.found} / {a.expected}", f"{b.found} / {b.expected}", ""))
    rows.append(("  lost / doubled", f"{a.lost} / {a.doubled}", f"{b.lost} / {b.doubled}", ""))
    rows.append(("  out of order / torn pairs", f"{a.out_of_order} / {a.torn}",
                 f"{b.out_of_order} / {b.torn}", ""))
    rows.append(("  failed calls", str(a.failed_calls), str(b.failed_calls), ""))
    head = ("scenario", "SQLiteSession", "ConvlogSession", "convlog/sqlite")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]

    def line(r: tuple[str, str, str, str]) -> str:
        cells = [r[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True))]
        return "  ".join(cells).rstrip()

    print(f"Agents SDK sessions, {results['ops']} calls per scenario "
          f"(openai-agents {results['sdk_version']}; SQLiteSession on a local file, "
          "ConvlogSession over NATS to the log service)", file=out)
    print(line(head), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for r in rows:
        print(line(r), file=out)
    out.flush()


async def run_sdk_bench(url: str | None, ops: int, out: TextIO) -> dict[str, Any]:
    """Measure ConvlogSession against SQLiteSession and print the table to ``out``.

    Args:
        url: NATS URL of a running log service, or ``None`` to start a local
            nats-server and ``convlog log`` for the run.
        ops: calls per scenario (split across writers/processes where there are several).
        out: where the table goes.

    Returns:
        ``{"sqlite": {...}, "convlog": {...}, "ops": ops, "sdk_version": ...}``:
        :class:`Measure` per in-process scenario and :class:`Mixing` under ``"processes"``.

    Raises:
        ImportError: the Agents SDK is missing (names ``pip install 'convlog[agents]'``).
    """
    agents = require_agents_sdk()
    run_id = f"sdkbench-{int(time.time() * 1000)}"
    per_process = max(1, ops // PROCESSES)
    results: dict[str, Any] = {"ops": ops, "sdk_version": getattr(agents, "__version__", "?")}
    with tempfile.TemporaryDirectory(prefix="convlog-sdk-bench-") as tmp:
        base = Path(tmp)
        workers = _Workers()
        async with contextlib.AsyncExitStack() as stack:
            await workers.start()  # they import the SDK while the stack starts
            stack.push_async_callback(workers.stop)
            if url is None:
                url = await stack.enter_async_context(_local_stack(base))
            else:
                await _wait_for_log_service(url, timeout=5)
            await workers.run_ready()
            for key, store in (("sqlite", _SQLiteStore(base / "sdk_sessions.db")),
                               ("convlog", _ConvlogStore(url))):
                try:
                    results[key] = await _in_process(store, ops, run_id)
                finally:
                    await store.close()
            results["sqlite"]["processes"] = await _processes(
                workers, "sqlite", str(base / "sdk_shared.db"), f"{run_id}-procs", per_process)
            results["convlog"]["processes"] = await _processes(
                workers, "convlog", url, f"{run_id}-procs", per_process)
    _report(results, out)
    return results


# -- worker process -------------------------------------------------------------


async def _worker_job(tag: str, job: dict[str, Any], lines: asyncio.Queue[str]) -> dict[str, Any]:
    kind, target = job["kind"], job["target"]
    store: _Store = _SQLiteStore(Path(target)) if kind == "sqlite" else _ConvlogStore(target)
    session = store.session(job["sid"])
    errors: dict[str, int] = {}
    done = 0
    try:
        await session.get_items(limit=1)  # open / connect before "go"
        print(json.dumps({"armed": tag}), flush=True)
        if await lines.get() != "go":
            raise RuntimeError("expected 'go'")
        start = time.perf_counter()
        for n in range(job["count"]):
            try:
                await session.add_items([_item(tag, n), _item(tag, n, "assistant")])
                done += 1
            except Exception as e:  # counted and reported: the bench is about what survives
                errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
        seconds = time.perf_counter() - start
    finally:
        await store.close()
    return {"tag": tag, "calls": done, "errors": sum(errors.values()), "error_kinds": errors,
            "seconds": seconds}


async def _worker(tag: str) -> None:
    """Serve jobs from stdin until it closes (see :class:`_Workers`)."""
    require_agents_sdk()
    import agents.memory.sqlite_session  # noqa: F401 - the import cost is paid before "ready"

    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str] = asyncio.Queue()

    def read_stdin() -> None:
        for raw in sys.stdin:
            loop.call_soon_threadsafe(lines.put_nowait, raw.strip())
        loop.call_soon_threadsafe(lines.put_nowait, "")

    # A daemon thread: a worker that fails must still be able to exit.
    threading.Thread(target=read_stdin, name="stdin", daemon=True).start()
    print(json.dumps({"ready": tag}), flush=True)
    while line := await lines.get():
        try:
            print(json.dumps(await _worker_job(tag, json.loads(line), lines)), flush=True)
        except Exception as e:
            print(json.dumps({"tag": tag, "fatal": f"{type(e).__name__}: {e}"}), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m services.bench.sdk",
                                description="ConvlogSession vs the Agents SDK's SQLiteSession")
    p.add_argument("--url", help="NATS URL of a running log service (default: start a local stack)")
    p.add_argument("--ops", type=int, default=1000, help="calls per scenario (default 1000)")
    p.add_argument("--worker", metavar="TAG", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        asyncio.run(_worker(args.worker))
        return 0
    if args.ops < PROCESSES:
        p.error(f"--ops must be at least {PROCESSES}")
    started = time.monotonic()
    asyncio.run(run_sdk_bench(args.url, args.ops, sys.stdout))
    print(f"(run took {time.monotonic() - started:.1f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
