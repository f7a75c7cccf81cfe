"""One OS process using a ``ConvlogSession``, for the multi-process consistency test.

Run with ``python -m tests.support.session_rw --url URL --sid SID --tag T
--role writer|reader [--count N] [--pop-every K] [--clear-at N]``.

It prints ``{"ready": tag}`` once its session has read (so its local copy
follows the session), waits for a ``go`` line on stdin, then:

* a **writer** makes ``--count`` calls ``add_items([user "<tag>-<n>",
  assistant "<tag>-<n>-r"])``, each followed by ``get_items()`` (recorded: it
  must include the pair just written); every ``--pop-every``-th call is
  followed by a ``pop_item()``, and call ``--clear-at`` by a ``clear_session()``;
* a **reader** calls ``get_items()`` in a loop, recording every view that
  differs from the one before, until a line ``stop <json list>`` arrives;
  then it keeps reading until its view equals that list (the final visible
  history, as the test computed it from the log) or ``--converge-s`` pass.

Views are lists of item texts.  The last line printed is the JSON result.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from shared import ConvlogSession


def _text(item: dict[str, Any]) -> str:
    content = item.get("content")
    return content if isinstance(content, str) else content[0]["text"]


def _view(items: list[dict[str, Any]]) -> list[str]:
    return [_text(i) for i in items]


async def _lines() -> asyncio.Queue[str]:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str] = asyncio.Queue()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def pump() -> None:
        while line := await reader.readline():
            queue.put_nowait(line.decode().strip())
        queue.put_nowait("")

    queue.task = asyncio.create_task(pump())  # type: ignore[attr-defined]
    return queue


async def _writer(session: ConvlogSession, args: argparse.Namespace) -> dict[str, Any]:
    after_add: list[list[str]] = []
    popped: list[str | None] = []
    for n in range(args.count):
        user = {"role": "user", "content": f"{args.tag}-{n}"}
        reply = {"type": "message", "role": "assistant",
                 "content": [{"type": "output_text", "text": f"{args.tag}-{n}-r", "annotations": []}]}
        await session.add_items([user, reply])
        after_add.append(_view(await session.get_items()))
        if args.pop_every and n % args.pop_every == args.pop_every - 1:
            item = await session.pop_item()
            popped.append(_text(item) if item else None)
        if n == args.clear_at:
            await session.clear_session()
    return {"after_add": after_add, "popped": popped}


async def _reader(session: ConvlogSession, lines: asyncio.Queue[str],
                  args: argparse.Namespace) -> dict[str, Any]:
    views: list[list[str]] = []
    stop: asyncio.Task[str] = asyncio.create_task(lines.get())
    while not stop.done():
        view = _view(await session.get_items())
        if not views or view != views[-1]:
            views.append(view)
        await asyncio.sleep(0.002)
    final = json.loads(stop.result().split(" ", 1)[1])
    started = time.monotonic()
    converged = False
    while time.monotonic() - started < args.converge_s:
        view = _view(await session.get_items())
        if view != views[-1]:
            views.append(view)
        if view == final:
            converged = True
            break
        await asyncio.sleep(0.01)
    return {"views": views, "converged": converged, "converge_s": time.monotonic() - started}


async def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="session_rw")
    p.add_argument("--url", required=True)
    p.add_argument("--sid", required=True)
    p.add_argument("--tag", required=True)
    p.add_argument("--role", choices=["writer", "reader"], required=True)
    p.add_argument("--count", type=int, default=20)
    p.add_argument("--pop-every", type=int, default=0)
    p.add_argument("--clear-at", type=int, default=-1)
    p.add_argument("--converge-s", type=float, default=10.0)
    args = p.parse_args(argv)
    lines = await _lines()
    session = ConvlogSession.from_url(args.sid, url=args.url)
    try:
        await session.get_items()  # connect and start following before "go"
        print(json.dumps({"ready": args.tag}), flush=True)
        if await lines.get() != "go":
            raise SystemExit("expected 'go'")
        if args.role == "writer":
            result = await _writer(session, args)
        else:
            result = await _reader(session, lines, args)
        result["copy"] = session.copy_info()
    finally:
        await session.close()
    print(json.dumps({"tag": args.tag, **result}), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
