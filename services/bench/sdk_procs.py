"""The SDK bench's multi-process scenario: four OS processes add user/assistant
pairs to one session id at once; the parent reads the session back and counts
what was lost, doubled, reordered or torn apart.

The processes are this module run with ``--worker TAG``; they talk JSON lines
on stdin/stdout (see :class:`Workers`).
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.agents_session import require_agents_sdk
from shared.config import Settings

from .sdk_breakdown import CallClock, ClientSplit
from .sdk_stores import ConvlogSessions, Sessions, SQLiteSessions, bench_item
from .stack import CONNECTION

__all__ = ["PROCESSES", "Mixing", "Workers", "check_mixing", "run_processes"]

PROCESSES = 4


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


class Workers:
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
                sys.executable, "-m", "services.bench.sdk_procs", "--worker", tag,
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

    def counts(self, calls: int) -> dict[str, int]:
        """``calls`` in all over the workers (the first ``calls % PROCESSES`` make one more)."""
        return {tag: calls // len(self.tags) + (i < calls % len(self.tags)) for i, tag in enumerate(self.tags)}

    async def run(
        self, kind: str, target: str, sid: str, counts: dict[str, int], settings: Settings | None = None
    ) -> list[dict[str, Any]]:
        job: dict[str, Any] = {"kind": kind, "target": target, "sid": sid}
        if settings is not None:  # (over the pipe: a password never shows in a process list)
            job["settings"] = {name: getattr(settings, name) for name in CONNECTION}
        for tag, proc in zip(self.tags, self.procs, strict=True):
            assert proc.stdin is not None
            proc.stdin.write(json.dumps({**job, "count": counts[tag]}).encode() + b"\n")
            await proc.stdin.drain()
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


async def run_processes(
    workers: Workers, kind: str, target: str, sid: str, calls: int, settings: Settings | None = None
) -> tuple[Mixing, ClientSplit]:
    """The workers add ``calls`` pairs in all to one session at once; read it back and check.

    ``settings``: the prefix and credentials of the log service at ``target`` (a NATS URL).

    Returns:
        What the read-back found, and the workers' summed call timings
        (:class:`~.sdk_breakdown.CallClock`).
    """
    counts = workers.counts(calls)
    summaries = await workers.run(kind, target, sid, counts, settings)
    split = ClientSplit()
    for x in summaries:
        split.add(ClientSplit.from_dict(x["split"]))
    failed = sum(x["errors"] for x in summaries)
    seconds = max(x["seconds"] for x in summaries)  # they start together: the slowest is the wall time
    store: Sessions = SQLiteSessions(Path(target)) if kind == "sqlite" else ConvlogSessions(target, settings)
    try:
        items = await store.session(sid).get_items()
    finally:
        await store.close()
    done = sum(x["calls"] for x in summaries)
    return check_mixing(items, counts, failed, done, seconds), split


def check_mixing(
    items: list[dict[str, Any]], counts: dict[str, int], failed: int, calls: int, seconds: float,
) -> Mixing:
    """``counts``: the pairs each worker (by tag) was asked to add."""
    marks: list[tuple[str, int, str]] = []
    for item in items:
        content = item.get("content")
        body = content if isinstance(content, str) else content[0]["text"]
        tag, n = body[1:].split("]", 1)[0].split()
        marks.append((tag, int(n), item.get("role", "")))
    expected = {(t, n, r) for t, count in counts.items() for n in range(count) for r in ("user", "assistant")}
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


async def _worker_job(tag: str, job: dict[str, Any], lines: asyncio.Queue[str]) -> dict[str, Any]:
    kind, target = job["kind"], job["target"]
    settings = Settings(nats_url=target, **job["settings"]) if "settings" in job else None
    store: Sessions = SQLiteSessions(Path(target)) if kind == "sqlite" else ConvlogSessions(target, settings)
    session = store.session(job["sid"])
    errors: dict[str, int] = {}
    done = 0
    clock = CallClock()
    try:
        await session.get_items(limit=1)  # open / connect before "go"
        client = getattr(session, "client", None)
        if client is not None:
            client.observer = clock.observe
        print(json.dumps({"armed": tag}), flush=True)
        if await lines.get() != "go":
            raise RuntimeError("expected 'go'")
        start = time.perf_counter()
        for n in range(job["count"]):
            pair = [bench_item(tag, n), bench_item(tag, n, "assistant")]
            try:
                await clock.timed(lambda pair=pair: session.add_items(pair))
                done += 1
            except Exception as e:  # counted and reported: the bench is about what survives
                errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
        seconds = time.perf_counter() - start
    finally:
        await store.close()
    return {"tag": tag, "calls": done, "errors": sum(errors.values()), "error_kinds": errors,
            "seconds": seconds, "split": clock.split.to_dict()}


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


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        asyncio.run(_worker(sys.argv[2]))
