"""``convlog tail --count`` and ``convlog send`` end as soon as they have printed
what they wait for (found in a review): both left their follower suspended when
they stopped reading it, so its JetStream consumer stayed subscribed, and the
items that had already come for it, unread, made the close's drain wait out
nats-py's 30 s drain timeout before the command exited.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from pathlib import Path

from shared.client import LogClient
from tests.support.fake_openai import FakeOpenAI, text
from tests.support.procs import REPO_ROOT, service_env
from tests.support.workerstack import WorkerStack, solo_spec


def _cli_env(tmp: Path, url: str) -> dict[str, str]:
    return {**service_env(tmp / "cli"), "CONVLOG_NATS_URL": url}


async def _consumers(client: LogClient, sid: str) -> int:
    js = client.nc.jetstream()
    stream = await js.find_stream_name_by_subject(client.subjects.items(sid))
    return (await js.stream_info(stream)).state.consumer_count or 0


async def test_tail_count_exits_at_once_when_more_items_came(log_url: str, tmp_path: Path) -> None:
    client = await LogClient.connect(log_url)
    proc = None
    try:
        await client.append("s", [{"agent": "user", "data": {"role": "user", "content": "first"}}])
        before = await _consumers(client, "s")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.cli.main", "tail", "s", "--after", "1", "--count", "1",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=_cli_env(tmp_path, log_url), cwd=REPO_ROOT)
        deadline = time.monotonic() + 20
        while await _consumers(client, "s") <= before:  # tail follows live now
            assert time.monotonic() < deadline, "tail made no consumer"
            await asyncio.sleep(0.05)
        # Three items in one burst: tail prints the first and stops; the others reach its consumer.
        await client.append("s", [{"agent": "user", "data": {"role": "user", "content": f"m{i}"}}
                                  for i in range(3)])
        started = time.monotonic()
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        took = time.monotonic() - started
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        await client.close()
    assert proc.returncode == 0, err
    assert [line.split()[0] for line in out.decode().splitlines()] == ["#2"], out
    assert took < 10, took  # not nats-py's 30 s drain timeout
    assert b"DrainTimeoutError" not in err, err


async def test_send_exits_at_once_when_more_items_came_after_the_reply(
    stack: WorkerStack, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    """Another writer appends to the session right after the turn's reply (send
    skips its items).  The reply is longer than a pipe holds and send's standard
    output is read only once those items are stored, so they reach send's consumer
    before it stops following, whatever the timing."""
    reply = "word " * 30_000  # 150 KB: send's print of it waits for its reader
    fake_openai.responder(lambda request: text(reply))
    await stack.start_workers(stack.worker("Solo", solo_spec(tmp_path / "solo.toml")))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli.main", "send", "busy", "hello", "--timeout", "30",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=_cli_env(tmp_path, stack.server.url), cwd=REPO_ROOT)
    try:
        assert proc.stderr is not None and proc.stdout is not None
        first = (await asyncio.wait_for(proc.stderr.readline(), 30)).decode()
        assert first == "sent #1 to busy\n", first

        async def the_reply() -> None:
            async with contextlib.aclosing(stack.client.follow("busy")) as items:
                async for env in items:
                    if env.agent == "Solo" and env.data.get("role") == "assistant":
                        return

        await asyncio.wait_for(the_reply(), 30)
        await stack.client.append("busy", [{"agent": "system", "data": {"note": n}} for n in range(3)])
        await asyncio.sleep(0.5)  # delivered to send's consumer, unread
        started = time.monotonic()
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        took = time.monotonic() - started
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err
    assert reply.strip() in out.decode(), out[:200]
    assert took < 10, took  # not nats-py's 30 s drain timeout
    assert b"DrainTimeoutError" not in err, err


async def test_tail_ends_when_the_reader_of_its_output_is_gone(log_url: str, tmp_path: Path) -> None:
    """``convlog tail s | head -1`` on a quiet session: head took its line and
    exited, but tail noticed only at its next print (EPIPE), so the pipeline
    hung until the session's next item came, if ever."""
    client = await LogClient.connect(log_url)
    read_end, write_end = os.pipe()
    proc = None
    try:
        await client.append("s", [{"agent": "user", "data": {"role": "user", "content": f"m{i}"}}
                                  for i in range(3)])
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.cli.main", "tail", "s",
            stdout=write_end, stderr=asyncio.subprocess.PIPE,
            env=_cli_env(tmp_path, log_url), cwd=REPO_ROOT)
        os.close(write_end)
        write_end = -1
        with os.fdopen(read_end, "rb") as out:  # `head -1`: one line, then gone
            read_end = -1
            first = await asyncio.to_thread(out.readline)
        assert first.startswith(b"#1 "), first
        started = time.monotonic()
        _, err = await asyncio.wait_for(proc.communicate(), 15)  # no item comes meanwhile
        took = time.monotonic() - started
    finally:
        for fd in (read_end, write_end):
            if fd >= 0:
                os.close(fd)
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        await client.close()
    assert proc.returncode == 0, err
    assert took < 5, took
    assert b"Traceback" not in err, err


async def test_tail_of_a_session_with_no_items_says_it_waits_for_the_first(
    log_url: str, tmp_path: Path
) -> None:
    """``convlog tail`` of a session with no items (a mistyped id, or one not begun)
    printed nothing at all: it looked just like a quiet session that has items."""
    client = await LogClient.connect(log_url)
    proc = None
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.cli.main", "tail", "not-yet", "--count", "1",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=_cli_env(tmp_path, log_url), cwd=REPO_ROOT)
        assert proc.stderr is not None
        said = (await asyncio.wait_for(proc.stderr.readline(), 10)).decode()
        assert "'not-yet' has no items yet" in said and "waiting" in said, said
        await client.append("not-yet", [{"agent": "user", "data": {"role": "user", "content": "hi"}}])
        out, err = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        await client.close()
    assert proc.returncode == 0, err
    assert [line.split()[0] for line in out.decode().splitlines()] == ["#1"], out
