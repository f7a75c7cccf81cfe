"""A handoff whose routing checkpoint never reached the KV bucket (the log service
died in the ~20 ms the write waits, or the bucket lost it) must not cost the
session a forward per turn for good: the restarted log service addresses the
agent the log's handoff names, and repairs the checkpoint from it.

Real nats-server, the real log service (in-process, restarted on the same SQLite
file) and real ``convlog worker`` processes; the model is the fake OpenAI server.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nats
import nats.js.errors

from services.log.service import LogService
from shared.client import LogClient
from shared.config import load_settings
from shared.routing import decode_checkpoint, open_routing_bucket
from shared.work import work_stream_name
from tests.support.eventually import assert_eventually
from tests.support.fake_openai import FakeOpenAI
from tests.support.logenv import user
from tests.support.natsd import NatsServer
from tests.support.workerstack import SEED_SPEC, WorkerStack, support_responder

WORK = "CONVLOG_WORK"


async def _delivered(stack: WorkerStack) -> dict[str, int]:
    infos = await stack.nc.jetstream().consumers_info(WORK)
    return {i.name.removeprefix("convlog-agent-"): i.delivered.consumer_seq for i in infos}


async def _restart(stack: WorkerStack) -> None:
    await stack.service.shutdown()
    stack.service = LogService(stack.settings)
    await stack.service.start()


async def _turn(stack: WorkerStack, sid: str, text: str, users: int) -> dict[str, int]:
    """Deliveries per agent the turn of ``text`` cost."""
    before = await _delivered(stack)
    await stack.send(sid, text)
    log = await stack.answered(sid, users=users)
    assert [e.agent for e in log if e.item_id.endswith(".reply")][-1] == "L1Billing"
    after = await _delivered(stack)
    return {a: after[a] - before.get(a, 0) for a in after if after[a] != before.get(a, 0)}


async def test_a_handoff_checkpoint_lost_by_a_crash_is_repaired_and_turns_cost_one_delivery(
    stack: WorkerStack, fake_openai: FakeOpenAI
) -> None:
    fake_openai.responder(support_responder)
    await stack.start_workers(*(stack.worker(a, SEED_SPEC) for a in ("Triage", "L1Billing")))
    writer = stack.service.routing_writer
    assert writer is not None
    writer.delay = 3600.0  # the checkpoint write waits; the crash below comes first

    # Triage hands the session to L1Billing, which answers.
    assert await _turn(stack, "lost-cp", "a billing question", 1) == {"Triage": 1, "L1Billing": 1}
    # kill -9 within the write's delay: the handoff is committed, its checkpoint never written.
    assert writer._task is not None
    writer._task.cancel()
    kv = await open_routing_bucket(stack.nc, stack.settings.subjects)
    try:
        await kv.get("lost-cp")
        raise AssertionError("the checkpoint was written")
    except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
        pass
    await _restart(stack)

    # Each later turn is one delivery, to the agent the log's handoff names (not
    # Triage's, forwarded on to L1Billing), and the checkpoint follows the log.
    for i in range(2, 5):
        assert await _turn(stack, "lost-cp", f"more billing {i}", i) == {"L1Billing": 1}
    cp = decode_checkpoint((await kv.get("lost-cp")).value or b"")
    handoff = next(e for e in await stack.log("lost-cp")
                   if e.data.get("type") == "function_call_output")
    assert (cp.active, cp.order) == ("L1Billing", handoff.item_order)


async def test_a_checkpoint_ahead_of_a_restored_log_is_not_followed_by_the_notices(
    stack: WorkerStack, fake_openai: FakeOpenAI
) -> None:
    fake_openai.responder(support_responder)
    agents = ("Triage", "L1Billing", "L2Support")
    procs = await stack.start_workers(*(stack.worker(a, SEED_SPEC) for a in agents))
    assert await _turn(stack, "restored", "a billing question", 1) == {"Triage": 1, "L1Billing": 1}
    await stack.service.shutdown()
    backup = stack.tmp / "backup"
    backup.mkdir()
    for f in stack.tmp.glob("log.db*"):
        shutil.copy2(f, backup / f.name)
    await _restart(stack)
    # L1Billing escalates to L2Support: its checkpoint is written after the backup was taken.
    await stack.send("restored", "I want a refund")
    log = await stack.answered("restored", users=2)
    assert [e.agent for e in log if e.item_id.endswith(".reply")][-1] == "L2Support"
    kv = await open_routing_bucket(stack.nc, stack.settings.subjects)

    async def escalated() -> None:
        assert decode_checkpoint((await kv.get("restored")).value or b"").active == "L2Support"

    await assert_eventually(escalated, timeout=5)

    # Everything stops; the log is restored from the backup (the escalation is gone from
    # it, not from the routing bucket), and everything starts again.
    await stack.service.shutdown()
    for p in procs:
        p.terminate(8.0)
    for f in stack.tmp.glob("log.db*"):
        f.unlink()
    for f in backup.iterdir():
        shutil.copy2(f, stack.tmp / f.name)
    # As the service says of a restored database: its items stream goes too; and the work
    # stream, whose duplicate window would drop the notices of the orders used again.
    await stack.nc.jetstream().delete_stream(stack.settings.subjects.stream_name)
    await stack.nc.jetstream().delete_stream(WORK)
    stack.service = LogService(stack.settings)
    await stack.service.start()
    await stack.start_workers(*(stack.worker(a, SEED_SPEC) for a in agents))

    # The log says L1Billing answers: one delivery each, none to L2Support to forward.
    for i in range(2, 4):
        assert await _turn(stack, "restored", f"more billing {i}", i) == {"L1Billing": 1}


def _copy_db(src: Path, dst: Path) -> Path:
    dst.mkdir(exist_ok=True)
    for f in src.glob("log.db*"):
        shutil.copy2(f, dst / f.name)
    return dst


def _handoff(target: str, n: int) -> dict[str, object]:
    return {"agent": "Triage", "item_id": f"t.Triage.{n}.out", "data": {
        "type": "function_call_output", "call_id": f"c{n}", "output": json.dumps({"assistant": target})}}


# After a restore from a backup the routing bucket keeps the checkpoint of a handoff
# the restored log lost ("L2Support after #5", the log ending at #3).  The notices
# followed the log instead, but nothing ever replaced that checkpoint: every worker
# without its own facts read it, warned that the log disagrees and replayed the whole
# log at each turn, and -- the writer moving checkpoints forward only -- each handoff
# the restored log committed at an order up to #5 was never checkpointed.  The log
# service now replaces a checkpoint the log disproves with the log's own.
async def test_a_checkpoint_ahead_of_a_restored_log_is_replaced_by_the_logs(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    settings = load_settings({"nats_url": nats_server.url, "db": str(tmp_path / "log.db"),
                              "data_dir": str(tmp_path)}, environ={})
    sid = "restored"
    nc = await nats.connect(nats_server.url)
    service = LogService(settings)
    try:
        kv = await open_routing_bucket(nc, settings.subjects)
        client = LogClient(nc, timeout=5, deadline=10)

        async def checkpoint(active: str, order: int) -> None:
            try:
                cp = decode_checkpoint((await kv.get(sid)).value or b"")
            except nats.js.errors.KeyNotFoundError as e:
                raise AssertionError("no checkpoint") from e
            assert (cp.active, cp.order) == (active, order), cp

        await service.start()
        await client.append(sid, [user("a billing question"), _handoff("L1Billing", 1),
                                  {"agent": "L1Billing", "data": {"role": "assistant", "content": "sure"}}])
        await assert_eventually(lambda: checkpoint("L1Billing", 2), timeout=5)
        await service.shutdown()
        backup = _copy_db(tmp_path, tmp_path / "backup")
        service = LogService(settings)
        await service.start()
        await client.append(sid, [user("I want a refund"), _handoff("L2Support", 2)])
        await assert_eventually(lambda: checkpoint("L2Support", 5), timeout=5)

        # The log is restored (README): the service stopped, the file replaced, both streams deleted.
        await service.shutdown()
        for f in tmp_path.glob("log.db*"):  # noqa: ASYNC240 - a few small files
            f.unlink()
        _copy_db(backup, tmp_path)
        js = nc.jetstream()
        await js.delete_stream(settings.subjects.stream_name)
        await js.delete_stream(work_stream_name(settings.subjects))
        service = LogService(settings)
        await service.start()

        # The next message's notice follows the log, and the checkpoint is the log's again.
        assert (await client.append(sid, [user("more billing")])).first_order == 4
        await assert_eventually(lambda: checkpoint("L1Billing", 2), timeout=5)
        # So a handoff the restored log commits at an order the lost one had used is checkpointed.
        await client.append(sid, [_handoff("Triage", 3)])
        await assert_eventually(lambda: checkpoint("Triage", 5), timeout=5)
    finally:
        await service.shutdown()
        await nc.close()
