"""A load writer for fault and property tests: one OS process, one ``LogClient``.

Run with ``python -m tests.support.writer --url URL --name W --sessions a,b
--out acks.jsonl [--count N] [--batch-every K] [--stop-file F] ...``.

It appends one request at a time, round-robin over the sessions, until it has
made ``--count`` appends (0: no limit), the stop file exists, or
``--max-seconds`` passed (after the optional ``--go-file`` start barrier).  Every ``--batch-every``-th request is a 3-item
batch; the rest are single items.  Item ids are ``<name>-<n>-<k>``, fixed
before the first send, so a retry after an unknown outcome reuses them.

With ``--concurrency K`` the process runs K such writers at once (named
``<name>.0`` ... ``<name>.<K-1>``, each starting on a different session), over
one connection, as K clients of one application would.

Each acknowledged append is written at once as one JSONL line
``{"sid", "ids", "orders", "dup", "hashes", "w", "s", "t"}`` (``w`` the
writer, ``s`` and ``t`` the wall-clock times of the first send and of the ack; flushed, so a test can watch progress and
a crash of this process loses nothing recorded); the last line is
``{"summary": {...}}`` with the appends whose outcome stayed unknown after
``--attempts`` calls (each call itself retries until ``--deadline``).

With ``--cas`` each append is optimistic: read the session's ``last_order``,
append with ``expected_last`` set to it, and on ``conflict`` read and retry
(same ids); the ack line then also records ``expected_last``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

from shared.client import LogClient
from shared.errors import ConflictError, UnavailableError
from shared.messages import AppendItem


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="writer")
    p.add_argument("--url", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--sessions", required=True, help="comma-separated session ids")
    p.add_argument("--out", required=True, help="JSONL file for acks")
    p.add_argument("--count", type=int, default=0, help="appends to make; 0 = until stopped")
    p.add_argument("--batch-every", type=int, default=0, help="every K-th append is 3 items")
    p.add_argument("--pace", type=float, default=0.0, help="seconds to sleep between appends")
    p.add_argument("--stop-file", help="stop once this file exists")
    p.add_argument("--go-file", help="connect, then wait for this file before appending")
    p.add_argument("--max-seconds", type=float, default=60.0)
    p.add_argument("--timeout", type=float, default=2.0, help="per-request timeout")
    p.add_argument("--deadline", type=float, default=30.0, help="retry deadline per call")
    p.add_argument("--attempts", type=int, default=3, help="calls per append before 'unknown'")
    p.add_argument("--cas", action="store_true",
                   help="optimistic: read last_order, append with expected_last, retry on conflict")
    p.add_argument("--max-conflicts", type=int, default=500, help="conflict retries per append")
    p.add_argument("--concurrency", type=int, default=1, help="writers in this process")
    return p.parse_args(argv)


def _stop_requested(path: str | None) -> bool:
    # A stat per append is cheap next to a round trip; sync on purpose.
    return path is not None and os.path.exists(path)


@dataclass
class _Tally:
    unknown: list[dict[str, object]] = field(default_factory=list)
    appends: int = 0
    items: int = 0
    duplicates: int = 0
    conflicts: int = 0


async def _write(
    args: argparse.Namespace, client: LogClient, name: str, offset: int, started: float,
    out: TextIO, tally: _Tally,
) -> int:
    """One writer's loop; returns 0, or the exit code of a broken contract."""
    sessions = [s for s in args.sessions.split(",") if s]
    n = 0
    while args.count <= 0 or n < args.count:
        if _stop_requested(args.stop_file):
            break
        if time.monotonic() - started > args.max_seconds:
            break
        n += 1
        sid = sessions[(n + offset) % len(sessions)]
        size = 3 if args.batch_every and n % args.batch_every == 0 else 1
        batch = [
            AppendItem(
                agent=args.name,
                data={"role": "user", "content": f"{name} message {n}.{k}"},
                item_id=f"{name}-{n}-{k}",
            )
            for k in range(size)
        ]
        ids = [it.item_id for it in batch]
        expected: int | None = None
        unknown_tries = conflict_tries = 0
        sent = time.time()
        while True:  # bounded by --attempts and --max-conflicts
            try:
                if args.cas:
                    expected = await client.last_order(sid)
                reply = await client.append(sid, batch, expected_last=expected)
            except UnavailableError as e:
                print(f"writer {name}: append {n} unknown outcome: {e}", flush=True)
                unknown_tries += 1
                if unknown_tries >= args.attempts:
                    tally.unknown.append({"sid": sid, "ids": ids})
                    break
                continue
            except ConflictError:
                tally.conflicts += 1  # another writer got there first: read again, retry
                conflict_tries += 1
                if conflict_tries > args.max_conflicts:
                    print(f"writer {name}: append {n} lost {conflict_tries} races", flush=True)
                    return 4
                continue
            got = [i.item_id for i in reply.items]
            if got != ids:  # the reply must answer exactly what was asked
                print(f"writer {name}: reply ids {got} != {ids}", flush=True)
                return 3
            dup = [i.duplicate for i in reply.items]
            out.write(json.dumps({
                "sid": sid, "ids": ids, "orders": [i.item_order for i in reply.items], "dup": dup,
                "hashes": [i.hash for i in reply.items], "expected_last": expected,
                "w": name, "s": sent, "t": time.time(),
            }) + "\n")
            tally.appends += 1
            tally.items += size
            tally.duplicates += sum(dup)
            break
        if args.pace:
            await asyncio.sleep(args.pace)
    return 0


async def run(args: argparse.Namespace, out: TextIO) -> int:
    client = await LogClient.connect(args.url, name=f"writer-{args.name}")
    client.timeout, client.deadline = args.timeout, args.deadline
    started = time.monotonic()
    print(f"writer {args.name} connected", flush=True)
    # A start barrier, so several writers really overlap (bounded by --max-seconds).
    while args.go_file and not _stop_requested(args.go_file):
        if time.monotonic() - started > args.max_seconds:
            break
        await asyncio.sleep(0.01)
    started = time.monotonic()
    tally = _Tally()
    if args.concurrency <= 1:
        codes = [await _write(args, client, args.name, 0, started, out, tally)]
    else:
        codes = await asyncio.gather(*(
            _write(args, client, f"{args.name}.{j}", j, started, out, tally) for j in range(args.concurrency)
        ))
    if any(codes):
        return max(codes)
    summary = {
        "name": args.name, "appends": tally.appends, "items": tally.items, "duplicates": tally.duplicates,
        "conflicts": tally.conflicts,
        "unknown": tally.unknown, "seconds": round(time.monotonic() - started, 3),
    }
    out.write(json.dumps({"summary": summary}) + "\n")
    print(f"writer {args.name} done: {json.dumps(summary)}", flush=True)
    await client.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    # Line-buffered: each ack line reaches the file before the next append.
    with open(args.out, "a", buffering=1) as out:
        return asyncio.run(run(args, out))


if __name__ == "__main__":
    sys.exit(main())
