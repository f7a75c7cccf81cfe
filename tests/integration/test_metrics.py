"""Prometheus metrics of a running stack, scraped over HTTP after a known load.

The log service (in the test's loop, ``metrics_port=0``) and one ``convlog
worker`` process per agent of the reference scenario (offline rules model,
``--metrics-port 0``) play the seed conversation and the escalation; then the
test appends a known mix of good, duplicate, conflicting and malformed
requests and checks every count the scrape shows.
"""

from __future__ import annotations

import asyncio
import re
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.metrics import WORKER_REGISTRY
from services.worker.model import make_model_client
from services.worker.scenario import ESCALATION_CONVERSATION, SEED_CONVERSATION
from services.worker.spec import load_spec
from services.worker.turn import TurnPart, TurnRunner
from services.worker.turn_ids import turn_key
from shared.errors import ConflictError
from tests.support.eventually import assert_eventually
from tests.support.fake_openai import FakeOpenAI, text, tool_call
from tests.support.natsd import NatsServer
from tests.support.procs import Proc
from tests.support.workerstack import SEED_SPEC, WorkerStack, worker_stack

AGENTS = ("Triage", "L1Billing", "L1Technical", "L2Support")
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    """Every sample of ``http://127.0.0.1:PORT/metrics`` keyed by (name, labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 when absent (a labelled counter not yet incremented)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def worker_port(proc: Proc) -> int:
    m = proc.wait_for_line(r"worker \S+ metrics on http://[^:]+:(\d+)/metrics", timeout=20)
    return int(m.group(1))


@pytest.fixture
async def metered(nats_server: NatsServer, tmp_path: Path) -> Iterator[WorkerStack]:
    async with worker_stack(nats_server, tmp_path, None, metrics_port=0) as stack:
        yield stack  # type: ignore[misc]


async def test_scraped_counts_match_a_known_load(metered: WorkerStack) -> None:
    stack = metered
    procs = await stack.start_workers(
        *(stack.worker(a, SEED_SPEC, openai=False, args=["--metrics-port", "0"]) for a in AGENTS)
    )
    ports = {a: worker_port(p) for a, p in zip(AGENTS, procs, strict=True)}
    log_port = stack.service.metrics.port
    assert log_port

    # 1. The reference scenario: 4 + 3 user messages, every turn answered.
    async def play(sid: str, messages: tuple[str, ...]) -> None:
        for n, message in enumerate(messages, 1):
            await stack.send(sid, message)
            await stack.answered(sid, users=n)

    await asyncio.gather(play("m-seed", SEED_CONVERSATION), play("m-escalation", ESCALATION_CONVERSATION))

    # Turn parts by agent and outcome, as the scenario plays them (services/worker/scenario.py).
    expected_turns = {
        ("Triage", "handed_off"): 2,
        ("L1Billing", "replied"): 4, ("L1Billing", "handed_off"): 1,
        ("L2Support", "replied"): 3,
    }
    expected_model_calls = {"Triage": 2, "L1Billing": 5, "L1Technical": 0, "L2Support": 4}

    def workers_settled() -> dict[str, Samples]:
        got = {a: scrape(p) for a, p in ports.items()}
        seen = {(a, dict(k[1])["outcome"]): v for a, s in got.items() for k, v in s.items()
                if k[0] == "convlog_worker_turns_total"}
        for agent in got:
            for outcome in ("replied", "handed_off", "failed", "done", "retry", "error"):
                assert seen.get((agent, outcome), 0) == expected_turns.get((agent, outcome), 0), \
                    f"{agent} {outcome}: all turn counts {seen}\n{stack.outputs()}"
        return got

    w = await assert_eventually(workers_settled, timeout=20)
    assert value(w["Triage"], "convlog_worker_handoffs_total",
                 from_agent="Triage", to_agent="L1Billing") == 2
    assert value(w["L1Billing"], "convlog_worker_handoffs_total",
                 from_agent="L1Billing", to_agent="L2Support") == 1
    assert value(w["L2Support"], "convlog_worker_tool_calls_total",
                 agent="L2Support", tool="issue_refund", outcome="ok") == 1
    for agent, calls in expected_model_calls.items():
        s = w[agent]
        model = next((dict(k[1])["model"] for k in s if k[0] == "convlog_worker_model_call_seconds_count"),
                     None)
        if calls == 0:
            assert model is None, agent
            continue
        assert value(s, "convlog_worker_model_call_seconds_count", agent=agent, model=model,
                     outcome="ok") == calls, agent
        assert value(s, "convlog_worker_model_tokens_total", agent=agent, model=model,
                     kind="input") > 0
        assert value(s, "convlog_worker_model_tokens_total", agent=agent, model=model,
                     kind="output") > 0
        assert value(s, "convlog_worker_turn_seconds_count", agent=agent) == sum(
            n for (a, _), n in expected_turns.items() if a == agent)
        assert value(s, "convlog_worker_redeliveries_total", agent=agent) == 0

    # Every consumer drained: the sampled gauges reach 0 for every agent.
    def drained() -> None:
        for agent, port in ports.items():
            s = scrape(port)
            assert ("convlog_worker_consumer_pending", frozenset({("agent", agent)})) in s, agent
            assert value(s, "convlog_worker_consumer_pending", agent=agent) == 0
            assert value(s, "convlog_worker_consumer_ack_pending", agent=agent) == 0

    await assert_eventually(drained, timeout=20)

    # 2. A known load on the log service, measured as the difference of two scrapes
    #    (system items: no worker answers them, so nothing else is appended meanwhile).
    before = scrape(log_port)
    assert value(before, "convlog_log_request_seconds_count", endpoint="in") == 7
    for i in range(20):
        await stack.client.append("m-load", [{"agent": "ops", "data": {"role": "system", "content": str(i)}}])
    ack = await stack.client.append(
        "m-load", [{"agent": "ops", "data": {"role": "system", "content": f"b{i}"}} for i in range(3)]
    )
    first_id = ack.items[0].item_id
    again = await stack.client.append(
        "m-load", [{"agent": "ops", "item_id": first_id, "data": {"role": "system", "content": "b0"}}])
    assert again.items[0].duplicate
    with pytest.raises(ConflictError):
        await stack.client.append("m-load", [{"agent": "ops", "data": {"role": "system", "content": "x"}}],
                                  expected_last=1)
    reply = await stack.nc.request("convlog.append.m-load", b"not json", timeout=5)
    assert reply.headers and "bad_request" in reply.headers.get("Nats-Service-Error", "")

    after = scrape(log_port)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("convlog_log_appends_total", outcome="ok", code="") == 22  # 21 + the duplicate
    assert delta("convlog_log_appends_total", outcome="error", code="conflict") == 1
    assert delta("convlog_log_appends_total", outcome="error", code="bad_request") == 1
    assert delta("convlog_log_request_errors_total", endpoint="append", code="conflict") == 1
    # timed from arrival to reply: every request the store answered (not the malformed one)
    assert delta("convlog_log_request_seconds_count", endpoint="append") == 23
    assert delta("convlog_log_commit_batch_items_sum") == 23  # 20 + 3; the others wrote nothing
    batches = delta("convlog_log_commit_batch_items_count")
    assert 1 <= batches <= 21
    assert delta("convlog_log_commit_seconds_count") == batches
    assert delta("convlog_log_fsync_seconds_count") == batches
    assert after[("convlog_log_fsync_seconds_sum", frozenset())] <= \
        after[("convlog_log_commit_seconds_sum", frozenset())]
    assert value(after, "convlog_log_sessions") == 3
    assert value(after, "convlog_log_store_bytes") > 0

    # Everything committed reaches the items subjects: lag 0, published == the log.
    total = 0
    for sid in ("m-seed", "m-escalation", "m-load"):
        total += len(await stack.log(sid))

    def fanned_out() -> None:
        s = scrape(log_port)
        assert value(s, "convlog_log_published_items_total") == total
        assert value(s, "convlog_log_fanout_lag_items") == 0
        assert value(s, "convlog_log_fanout_lag_seconds") == 0

    await assert_eventually(fanned_out, timeout=20)


async def test_metrics_are_off_unless_a_port_is_set_and_a_taken_port_is_not_fatal(
    stack: WorkerStack,
) -> None:
    from services.metrics import NO_LOG_METRICS

    assert stack.service.metrics is NO_LOG_METRICS
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        off = stack.worker("Triage", SEED_SPEC, openai=False)
        clash = stack.worker("L1Billing", SEED_SPEC, openai=False, args=["--metrics-port", str(port)])
        await stack.start_workers(off, clash)
    assert "metrics" not in off.output()
    # The worker serves its agent anyway, and says loudly that it has no metrics.
    assert re.search(rf"ERROR .*worker L1Billing: cannot serve metrics on port {port} .*"
                     r"running without metrics", clash.output()), clash.output()


# The tool label is the agent's tool, not whatever name the model wrote: a model that
# makes names up (one per call) grew one series per made-up name, without bound.
async def test_tool_calls_to_made_up_names_share_one_label(stack: WorkerStack, fake_openai: FakeOpenAI) -> None:
    made_up = [f"lookup_order_{i}" for i in range(5)]
    fake_openai.script([*(tool_call(name, {}) for name in made_up),
                        tool_call("issue_refund", {"amount": 5, "reason": "double charge"}), text("done")])
    model = make_model_client("test", fake_openai.base_url, max_retries=0)
    runner = TurnRunner(stack.client, load_spec(SEED_SPEC).agent("L2Support"), model)
    ack = await stack.send("made-up-tools", "refund me")
    part = TurnPart("made-up-tools", turn_key(ack.items[0].item_id), ack.items[0].item_order)

    def calls() -> dict[tuple[str, str], float]:
        return {(s.labels["tool"], s.labels["outcome"]): s.value for f in WORKER_REGISTRY.collect()
                for s in f.samples if s.name == "convlog_worker_tool_calls_total"
                and s.labels["agent"] == "L2Support"}

    before = calls()
    try:
        assert (await runner.run(part)).outcome == "replied"
    finally:
        await model.client.close()
    after = calls()
    assert not {tool for tool, _ in after} & set(made_up), after
    assert after.get(("(unknown)", "error"), 0) - before.get(("(unknown)", "error"), 0) == 5
    assert after.get(("issue_refund", "ok"), 0) - before.get(("issue_refund", "ok"), 0) == 1


# The store gauges are the SQLite file's (README: "SQLite store only"). On the JetStream
# store the service's `path` is a label ("jetstream:CONVLOG_LOG_0"), whose size was
# reported: convlog_log_store_bytes 0, a store of no bytes on the dashboard.
async def test_the_jetstream_store_reports_no_sqlite_store_gauges(nats_server: NatsServer, tmp_path: Path) -> None:
    from services.log.service import LogService
    from shared.config import load_settings

    settings = load_settings({"nats_url": nats_server.url, "data_dir": str(tmp_path), "store": "jetstream",
                              "metrics_port": "0"}, environ={})
    async with LogService(settings) as svc:
        port = svc.metrics.port
        assert port
        samples = await asyncio.to_thread(scrape, port)
    names = {name for name, _ in samples}
    assert "convlog_log_appends_total" in names  # the service's own metrics are there
    assert "convlog_log_store_bytes" not in names, sorted(names)
    assert "convlog_log_sessions" not in names


async def test_a_connection_that_sends_no_request_does_not_hold_a_thread_for_good(tmp_path: Path) -> None:
    """The /metrics server of the log service and of each worker (a thread per connection,
    on every interface) waited for a request line with no time limit: each connection that
    sent nothing (a scraper's host gone without closing it, or anyone who can reach the
    port) held a thread of the process until it ended, so enough of them left it no
    threads to start.  A connection silent for REQUEST_TIMEOUT is now closed, and scrapes
    go on."""
    import threading

    from services import metrics
    from services.metrics.server import REQUEST_TIMEOUT
    from shared.config import load_settings

    settings = load_settings({"data_dir": str(tmp_path), "metrics_port": "0"}, environ={})
    server = metrics.serve(settings, WORKER_REGISTRY, "worker Triage")
    assert server is not None
    before = set(threading.enumerate())
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(20)]

    def handlers() -> list[threading.Thread]:  # the server's threads for these connections
        return [t for t in threading.enumerate() if t not in before and "process_request_thread" in t.name]

    def held() -> None:
        assert len(handlers()) == 20, handlers()

    def let_go() -> None:
        assert not handlers(), handlers()

    try:
        await assert_eventually(held, timeout=5)  # a thread each, waiting for a request
        await assert_eventually(let_go, timeout=REQUEST_TIMEOUT + 5)

        def scraped() -> int:
            with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as r:
                return r.status
        assert await asyncio.to_thread(scraped) == 200
    finally:
        for s in idle:
            s.close()
        metrics.close(server)
