"""A SQLite log restored from a backup while NATS keeps its streams: the log
service refuses the items stream (it holds items the restored database does
not), and what its refusal says to do must leave every later message answered
exactly once.  The restored log gives its next items orders the work stream
saw within its duplicate window (turn notice ids are ``<sid>:<item_order>``),
and the running workers hold what they learnt of the lost items.

Real nats-server, the real log service (in-process, restarted on the restored
file) and a real ``convlog worker`` process; the model is the fake OpenAI server.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from services.log.outbox import StreamMismatchError
from services.log.service import LogService
from tests.support.fake_openai import FakeOpenAI, text
from tests.support.workerstack import (
    SEED_SPEC,
    WorkerStack,
    agent_of,
    is_user,
    solo_spec,
    support_responder,
    terminal_items,
    user_texts,
)


async def test_following_the_refusal_of_a_restored_database_answers_every_later_message_once(
    stack: WorkerStack, fake_openai: FakeOpenAI
) -> None:
    fake_openai.responder(lambda r: text(f"Solo answers: {user_texts(r)[-1]}"))
    spec = solo_spec(stack.tmp / "solo.toml")
    await stack.start_workers(stack.worker("Solo", spec))
    await stack.send("s", "kept 1")
    await stack.answered("s", users=1)

    # The backup, taken with the service stopped; then two more turns, lost by the restore.
    backup = await _backup(stack)
    for i in (2, 3):
        await stack.send("s", f"lost {i}")
        await stack.answered("s", users=i)

    # The log is restored; the service refuses the items stream and says what to do.
    await stack.service.shutdown()
    for f in stack.tmp.glob("log.db*"):
        f.unlink()
    for f in backup.iterdir():
        shutil.copy2(f, stack.tmp / f.name)
    stack.service = LogService(stack.settings)
    with pytest.raises(StreamMismatchError) as refused:
        await stack.service.start()
    await stack.service.shutdown()
    advice = str(refused.value)
    assert "restored from an older copy" in advice, advice

    # Do as it says: delete each stream it names, restart the workers if it says so.
    js = stack.nc.jetstream()
    named = [s.config.name for s in await js.streams_info() if re.search(rf"\b{s.config.name}\b", advice)]
    assert stack.settings.subjects.stream_name in named, advice
    restart_workers = "worker" in advice
    if restart_workers:
        for p in stack.procs:
            p.terminate(8.0)
    for name in named:
        await js.delete_stream(name)
    stack.service = LogService(stack.settings)
    await stack.service.start()
    if restart_workers:
        await stack.start_workers(stack.worker("Solo", spec, name="worker-Solo-2"))

    # Every message sent since is answered, once, with the restored log as its history.
    for i in (2, 3, 4):
        await stack.send("s", f"new {i}")
        log = await stack.answered("s", users=i, timeout=15)
    asked = [e for e in log if is_user(e)]
    assert [e.data["content"] for e in asked] == ["kept 1", "new 2", "new 3", "new 4"]
    assert all(len(terminal_items(log, u)) == 1 for u in asked), log
    last = fake_openai.requests[-1]
    assert user_texts(last) == ["kept 1", "new 2", "new 3", "new 4"], last


async def test_following_the_refusal_no_worker_goes_on_with_the_lost_items_as_history(
    stack: WorkerStack, fake_openai: FakeOpenAI
) -> None:
    """A worker kept running keeps the model window of a session it played after the
    backup: past the young sessions' whole reads, its next turn there would be the
    lost items plus the new ones."""
    fake_openai.responder(support_responder)
    agents = ("Triage", "L1Billing", "L2Support")
    await stack.start_workers(*(stack.worker(a, SEED_SPEC) for a in agents))
    users = 1
    await stack.send("s", "a billing question")
    await stack.answered("s", users=1)
    while len(await stack.log("s")) < 36:  # no longer young: windows are kept between turns
        users += 1
        await stack.send("s", f"billing {users}")
        await stack.answered("s", users=users)
    backup = await _backup(stack)
    await stack.send("s", "refund lost-secret")  # L2Support plays it, after the backup
    await stack.answered("s", users=users + 1)

    advice = await _restore(stack, backup)
    js = stack.nc.jetstream()
    for name in [s.config.name for s in await js.streams_info() if re.search(rf"\b{s.config.name}\b", advice)]:
        await js.delete_stream(name)
    restart = "worker" in advice
    if restart:
        for p in stack.procs:
            p.terminate(8.0)
    stack.service = LogService(stack.settings)
    await stack.service.start()
    if restart:
        await stack.start_workers(*(stack.worker(a, SEED_SPEC, name=f"worker-{a}-2") for a in agents))

    await stack.send("s", "more billing")
    await stack.answered("s", users=users + 1, timeout=15)
    await stack.send("s", "refund now")
    await stack.answered("s", users=users + 2, timeout=15)
    asked = user_texts([r for r in fake_openai.requests if agent_of(r) == "L2Support"][-1])
    assert asked[-2:] == ["more billing", "refund now"], asked[-4:]
    assert "refund lost-secret" not in asked


async def _backup(stack: WorkerStack) -> Path:
    """Copy the database with the service stopped, and start it again."""
    await stack.service.shutdown()
    backup = stack.tmp / "backup"
    backup.mkdir()
    for f in stack.tmp.glob("log.db*"):
        shutil.copy2(f, backup / f.name)
    stack.service = LogService(stack.settings)
    await stack.service.start()
    return backup


async def _restore(stack: WorkerStack, backup: Path) -> str:
    """Put ``backup`` in place (service stopped); the refusal of the next start."""
    await stack.service.shutdown()
    _put_back(stack.tmp, backup)
    stack.service = LogService(stack.settings)
    with pytest.raises(StreamMismatchError) as refused:
        await stack.service.start()
    await stack.service.shutdown()
    return str(refused.value)


def _put_back(tmp: Path, backup: Path) -> None:
    for f in tmp.glob("log.db*"):
        f.unlink()
    for f in backup.iterdir():
        shutil.copy2(f, tmp / f.name)
