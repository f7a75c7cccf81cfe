"""OpenTelemetry traces (``convlog[otel]``): one user message is one trace, end to end.

The log service and two workers (offline rules model) run in the test's
process on a real nats-server, recording into the SDK's in-memory exporter.
``LogClient.send`` starts the trace; the ``traceparent`` travels in NATS
headers to the log service, on the committed item to the Triage worker, on
its handoff append back to the log service, and on to L1Billing's worker.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

from services.log.service import LogService  # noqa: E402
from services.worker.model import make_model_client  # noqa: E402
from services.worker.spec import load_spec  # noqa: E402
from services.worker.worker import Worker  # noqa: E402
from shared import tracing  # noqa: E402
from shared.client import LogClient  # noqa: E402
from shared.config import load_settings  # noqa: E402
from tests.support.eventually import assert_eventually  # noqa: E402
from tests.support.natsd import NatsServer  # noqa: E402
from tests.support.workerstack import SEED_SPEC  # noqa: E402


@pytest.mark.parametrize("store", ["sqlite", "jetstream"])
async def test_one_user_message_is_one_trace_from_send_to_the_last_agent(
    spans: InMemorySpanExporter, nats_server: NatsServer, tmp_path: Path, store: str
) -> None:
    # On SQLite the outbox adds the traceparent to the items it publishes; on
    # JetStream the store writes it with the items, and the items stream keeps it.
    settings = load_settings({"nats_url": nats_server.url, "db": str(tmp_path / "log.db"),
                              "grace": 2, "store": store}, environ={})
    async with _seed_stack(settings) as (_, _, client):
        ack = await client.send("t1", "Hi, I was charged twice for my subscription this month.")

        async def answered() -> None:
            log = await client.items("t1", raw=True)
            assert any(e.agent == "L1Billing" and e.data.get("role") == "assistant" for e in log)

        await assert_eventually(answered, timeout=20)
        for name, agent in (("convlog.turn", "Triage"), ("convlog.turn", "L1Billing")):
            await assert_eventually(lambda n=name, a=agent: _find(spans, n, agent=a), timeout=5)

    send = _find(spans, "convlog.send", session_id="t1")
    trace_id = send.context.trace_id
    log_in = _find(spans, "convlog.log.in", session_id="t1")
    assert log_in.parent.span_id == send.context.span_id
    assert log_in.attributes["convlog.first_order"] == ack.first_order

    triage = _find(spans, "convlog.turn", agent="Triage")
    assert triage.parent.span_id == log_in.context.span_id  # through the turn notice
    assert triage.attributes["convlog.item_order"] == ack.first_order
    inside = _children(spans, triage)
    assert [s.name for s in inside if s.name != "convlog.append"][:2] == \
        ["convlog.history_read", "convlog.model_call"]
    (handoff_append,) = [s for s in inside if s.name == "convlog.append"]
    (log_append,) = _children(spans, handoff_append)
    assert log_append.name == "convlog.log.append"

    billing = _find(spans, "convlog.turn", agent="L1Billing")
    # Through the handoff's notice: the log service's (under the handoff's commit), or the
    # handing-off worker's copy when that one reached the work stream first (under its turn).
    assert billing.parent.span_id in (log_append.context.span_id, triage.context.span_id)
    assert {s.name for s in _children(spans, billing)} >= {"convlog.history_read", "convlog.model_call",
                                                           "convlog.append"}
    for span in (log_in, triage, *inside, log_append, billing):
        assert span.context.trace_id == trace_id, span.name


async def test_without_a_provider_nothing_is_recorded_and_no_header_is_sent() -> None:
    assert not tracing.enabled()
    assert tracing.headers() is None
    with tracing.span("convlog.x") as span:
        assert span is None


def _find(exporter: InMemorySpanExporter, name: str, **attrs: Any) -> Any:
    found = [s for s in exporter.get_finished_spans() if s.name == name
             and all(s.attributes.get(f"convlog.{k}") == v for k, v in attrs.items())]
    assert found, f"no finished span {name} {attrs}"
    return found[0]


def _assert_child_of(msg: Any, span: Any) -> None:
    """``msg`` (a NATS message) carries ``span`` as its traceparent."""
    parent = (msg.headers or {}).get("traceparent")
    assert parent is not None, msg.headers
    assert parent.split("-")[1:3] == [f"{span.context.trace_id:032x}", f"{span.context.span_id:016x}"]


@contextlib.asynccontextmanager
async def _seed_stack(settings: Any, agents: tuple[str, ...] = ("Triage", "L1Billing"),
                      ) -> AsyncIterator[tuple[LogService, list[Worker], LogClient]]:
    """A log service and a worker per agent of the seed spec (offline model), all ready,
    and a client; stopped (:func:`_stop`) on the way out."""
    service = LogService(settings)
    await service.start()
    spec = load_spec(SEED_SPEC)
    workers = [Worker(settings, spec, agent, make_model_client(None)) for agent in agents]
    runs = [asyncio.create_task(w.run()) for w in workers]
    client = await LogClient.connect(settings.nats_url)
    try:
        await asyncio.wait_for(asyncio.gather(*(w.ready.wait() for w in workers)), 20)
        yield service, workers, client
    finally:
        await _stop(client, workers, runs, service)


async def _stop(client: LogClient, workers: list[Worker], runs: list[Any], service: LogService) -> None:
    """The client, the workers (their run tasks ended) and the log service, in that order."""
    await client.close()
    for w in workers:
        await w.shutdown()
    await asyncio.gather(*runs, return_exceptions=True)
    await service.shutdown()


async def _watch_notices(nc: Any, settings: Any) -> list[Any]:
    """Every turn notice published from now on (a plain subscription on the work subjects)."""
    notices: list[Any] = []

    async def on_notice(msg: Any) -> None:
        notices.append(msg)

    await nc.subscribe(f"{settings.subjects.prefix}.work.>", cb=on_notice)
    return notices


def _children(exporter: InMemorySpanExporter, parent: Any) -> list[Any]:
    kids = [s for s in exporter.get_finished_spans()
            if s.parent is not None and s.parent.span_id == parent.context.span_id]
    return sorted(kids, key=lambda s: s.start_time)


# An append refused after its span started (a batch signature checked on the event loop
# and found moved to another item) was answered `forbidden` straight from the except
# branch: its span never ended (never exported, kept alive by the exporter's processor)
# and convlog_log_request_seconds never saw it.
async def test_an_append_refused_after_its_span_started_ends_the_span_and_is_timed(
    spans: InMemorySpanExporter, nats_server: NatsServer, tmp_path: Path
) -> None:
    import msgspec

    from services.cli.main import main
    from shared.messages import AppendItem, AppendRequest
    from shared.signing import Signer

    keys = tmp_path / "keys"
    assert await asyncio.to_thread(main, ["keys", "init", "--out", str(keys)]) == 0
    settings = load_settings({"nats_url": nats_server.url, "db": str(tmp_path / "log.db"), "grace": 2,
                              "keyring": str(keys / "keyring.json"), "require_signatures": True,
                              "metrics_port": "0"}, environ={})
    service = LogService(settings)
    await service.start()
    client = await LogClient.connect(nats_server.url)
    client.signer = Signer.load(keys / "Triage.nk")

    def appends_timed() -> int:  # convlog_log_request_seconds_count{endpoint="append"}
        return sum(service.metrics.requests["append"].counts)

    try:
        items = [AppendItem(agent="Triage", data={"role": "assistant", "content": f"m{i}"}, item_id=f"r-{i}")
                 for i in range(2)]
        await client.append("r1", items)  # one batch signature over both
        envs = await client.items("r1")
        assert appends_timed() == 1 and "." in (envs[1].sig or "")
        moved = AppendItem(agent="Triage", data={"role": "assistant", "content": "m0"}, item_id="r-0x",
                           sig=envs[1].sig, key_id=envs[1].key_id)
        msg = await client.nc.request("convlog.append.r1", msgspec.json.encode(AppendRequest(items=[moved])),
                                      timeout=5)
        assert msgspec.json.decode(msg.data)["error"]["code"] == "forbidden"
        assert appends_timed() == 2
        refused = [s for s in spans.get_finished_spans() if s.name == "convlog.log.append"
                   and s.attributes.get("convlog.error") == "forbidden"]
        assert len(refused) == 1, [(s.name, dict(s.attributes or {})) for s in spans.get_finished_spans()]
        assert service._awaiting == 0
    finally:
        await client.close()
        await service.shutdown()


# A user message whose session the log service has not seen since it started (a restart, or
# a session forgotten beyond `remember`) has its agent looked up in the routing bucket before
# its turn notice is built; meanwhile the outbox published the item and took its trace context
# away, so the notice went out without a traceparent: the worker's turn began a trace of its own.
async def test_the_turn_notice_of_a_session_seen_before_a_restart_continues_the_trace(
    spans: InMemorySpanExporter, nats_server: NatsServer, tmp_path: Path
) -> None:
    import nats

    from shared.work import work_entry_subject

    settings = load_settings({"nats_url": nats_server.url, "db": str(tmp_path / "log.db"), "grace": 2},
                             environ={})
    client = await LogClient.connect(nats_server.url)
    nc = await nats.connect(nats_server.url)
    notices = await _watch_notices(nc, settings)
    try:
        async with LogService(settings):
            await client.send("r2", "Hi")
        async with LogService(settings):  # a restart: this process knows nothing of r2
            ack = await client.send("r2", "Hi again")
            await assert_eventually(lambda: _find(spans, "convlog.log.in", first_order=ack.first_order), timeout=5)

            def noticed() -> Any:
                found = [m for m in notices if m.headers and m.headers.get("Nats-Msg-Id") == f"r2:{ack.first_order}"]
                assert found, [m.headers for m in notices]
                return found[0]

            notice = await assert_eventually(noticed, timeout=10)
    finally:
        await nc.close()
        await client.close()
    assert notice.subject == work_entry_subject(settings.subjects)
    log_in = _find(spans, "convlog.log.in", first_order=ack.first_order)
    _assert_child_of(notice, log_in)


# A notice that reached a worker whose agent does not answer the session (a stale address:
# another instance committed a handoff) is forwarded to the agent the log names. The forward
# was published without the notice's traceparent: the agent that answered began a trace of
# its own, and the user message's trace ended at the log service.
async def test_a_forwarded_notice_continues_the_user_messages_trace(
    spans: InMemorySpanExporter, nats_server: NatsServer, tmp_path: Path
) -> None:
    settings = load_settings({"nats_url": nats_server.url, "db": str(tmp_path / "log.db"), "grace": 2},
                             environ={})
    async with _seed_stack(settings, ("Triage", "L1Billing", "L1Technical")) as (service, workers, client):
        assert service.notifier is not None
        service.notifier.note_active("f1", "L1Technical")  # stale: the log says Triage
        await client.send("f1", "Hi, I was charged twice for my subscription this month.")
        await assert_eventually(lambda: _find(spans, "convlog.turn", agent="Triage", session_id="f1"), timeout=20)
        assert workers[2].tally.forwarded == 1

    send = _find(spans, "convlog.send", session_id="f1")
    log_in = _find(spans, "convlog.log.in", session_id="f1")
    triage = _find(spans, "convlog.turn", agent="Triage", session_id="f1")
    assert not [s for s in spans.get_finished_spans() if s.name == "convlog.turn" and s.attributes.get(
        "convlog.agent") == "L1Technical"]
    assert triage.context.trace_id == send.context.trace_id
    assert triage.parent is not None and triage.parent.span_id == log_in.context.span_id


# A notice lost between the commit and its publish (the log service died, or left it to the
# reconciler while the work stream did not answer) is republished by the notice reconciler
# from the committed item on the items stream, which carries the item's traceparent; the
# republished notice had none: the worker's turn began a trace of its own.
@pytest.mark.parametrize("store", ["sqlite", "jetstream"])
async def test_a_notice_the_reconciler_republishes_continues_the_user_messages_trace(
    spans: InMemorySpanExporter, nats_server: NatsServer, tmp_path: Path, store: str
) -> None:
    import nats

    from shared.work import notice_msg_id

    settings = load_settings({"nats_url": nats_server.url, "db": str(tmp_path / "log.db"), "grace": 2,
                              "store": store}, environ={})
    client = await LogClient.connect(nats_server.url)
    nc = await nats.connect(nats_server.url)
    notices = await _watch_notices(nc, settings)
    try:
        async with LogService(settings) as service:
            assert service.notifier is not None and service.reconciler is not None
            lost: list[tuple[str, int]] = []
            service.notifier._start = lambda sid, order: lost.append((sid, order))  # as if it died

            ack = await client.send("rc1", "Hi")

            def republished() -> Any:
                found = [m for m in notices if m.headers and m.headers.get("Nats-Msg-Id") ==
                         notice_msg_id("rc1", ack.first_order)]
                assert found, [m.headers for m in notices]
                return found[0]

            notice = await assert_eventually(republished, timeout=15)
            assert lost == [("rc1", ack.first_order)] and service.reconciler.republished == 1
    finally:
        await nc.close()
        await client.close()
    log_in = _find(spans, "convlog.log.in", session_id="rc1")
    _assert_child_of(notice, log_in)


# On the JetStream store the log service's trace contexts are taken (popped) by the notice
# that carries them. A handoff's notice is first tried straight from the commit listener;
# when that could not be written at once (the public nats-py seam always, or something
# queued on the connection) it goes with the commit's other notices -- and its context had
# already been taken by the first try: the notice went out without a traceparent, and the
# handoff's target began a trace of its own.
async def test_a_handoff_notice_not_sent_at_once_still_continues_the_trace(
    spans: InMemorySpanExporter, nats_server: NatsServer, tmp_path: Path
) -> None:
    settings = load_settings({"nats_url": nats_server.url, "db": str(tmp_path / "log.db"), "grace": 2,
                              "store": "jetstream", "nats_seam": "public"}, environ={})
    async with _seed_stack(settings) as (_, _, client):
        for i in range(5):
            await client.send(f"h{i}", "Hi, I was charged twice for my subscription this month.")
        for i in range(5):
            await assert_eventually(lambda i=i: _find(spans, "convlog.turn", agent="L1Billing", session_id=f"h{i}"),
                                    timeout=20)

    for i in range(5):
        send = _find(spans, "convlog.send", session_id=f"h{i}")
        billing = _find(spans, "convlog.turn", agent="L1Billing", session_id=f"h{i}")
        assert billing.context.trace_id == send.context.trace_id, i


# A turn that keeps failing is ended, after max_attempts failed deliveries, with a system
# item "internal error after N attempts". Each failed attempt is a convlog.turn span in the
# user message's trace, but the give-up ran outside any span: the system item's append
# began a trace of its own, and the user message's trace never showed how it ended.
async def test_the_give_up_of_a_failing_turn_is_in_the_user_messages_trace(
    spans: InMemorySpanExporter, nats_server: NatsServer, tmp_path: Path
) -> None:
    from services.worker.spec import parse_spec
    from tests.support.workerstack import SOLO_SPEC

    class Failing:
        async def complete(self, *, model: str, messages: Any, tools: Any) -> Any:
            raise RuntimeError("a bug in the model client")

    settings = load_settings({"nats_url": nats_server.url, "db": str(tmp_path / "log.db"), "grace": 0},
                             environ={})
    service = LogService(settings)
    await service.start()
    worker = Worker(settings, parse_spec(SOLO_SPEC), "Solo", Failing(), max_attempts=2)
    run = asyncio.create_task(worker.run())
    client = await LogClient.connect(nats_server.url)
    try:
        await asyncio.wait_for(worker.ready.wait(), 20)
        await client.send("g1", "hello")

        async def ended() -> None:
            log = await client.items("g1", raw=True)
            assert any(e.agent == "system" for e in log), [e.data for e in log]

        await assert_eventually(ended, timeout=20)
        await assert_eventually(lambda: _find(spans, "convlog.append", session_id="g1"), timeout=5)
    finally:
        await client.close()
        await worker.shutdown()
        await asyncio.gather(run, return_exceptions=True)
        await service.shutdown()

    send = _find(spans, "convlog.send", session_id="g1")
    turns = [s for s in spans.get_finished_spans() if s.name == "convlog.turn"]
    assert len(turns) >= 2 and all(s.context.trace_id == send.context.trace_id for s in turns)
    (give_up,) = [s for s in spans.get_finished_spans() if s.name == "convlog.append"
                  and s.attributes.get("convlog.session_id") == "g1"]
    assert give_up.context.trace_id == send.context.trace_id
