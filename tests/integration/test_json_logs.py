"""``CONVLOG_LOG_FORMAT=json``: every line a real process writes is one JSON object.

A log service and two workers run as subprocesses with JSON logs, play a
handoff turn, and stop; every line of their output must parse, and the turn's
lines carry the session id, the trigger's item order, the agent and the turn.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

from services.worker.turn_ids import turn_key
from tests.support.logsvc import READY_LINE, service_env
from tests.support.natsd import NatsServer, free_port
from tests.support.procs import Proc
from tests.support.workerstack import SEED_SPEC, WorkerStack, run_cli


def json_lines(proc: Proc) -> list[dict[str, Any]]:
    records = []
    for line in proc.output().splitlines():
        record = json.loads(line)  # fails the test on any line that is not one JSON object
        assert isinstance(record, dict), line
        assert {"ts", "level", "logger", "msg"} <= set(record), line
        assert record["ts"].endswith("Z"), line
        records.append(record)
    return records


async def test_workers_log_one_json_object_per_line_with_turn_context(stack: WorkerStack) -> None:
    procs = [stack.worker(a, SEED_SPEC, openai=False) for a in ("Triage", "L1Billing")]
    for p in procs:
        p.env["CONVLOG_LOG_FORMAT"] = "json"
    await stack.start_workers(*procs)
    ack = await stack.send("j1", "Hi, I was charged twice for my subscription this month.")
    await stack.answered("j1", users=1)
    user = ack.items[0]
    for p in procs:
        p.terminate()

    triage, billing = (json_lines(p) for p in procs)
    turn = turn_key(user.item_id)
    (handoff,) = [r for r in triage if r.get("turn") == turn]
    assert handoff == {**handoff, "session_id": "j1", "item_order": user.item_order,
                       "agent": "Triage", "level": "INFO", "logger": "convlog.worker"}
    assert "handed_off -> L1Billing" in handoff["msg"]
    (reply,) = [r for r in billing if r.get("turn") == turn]
    assert reply["session_id"] == "j1" and reply["agent"] == "L1Billing"
    assert reply["item_order"] > user.item_order  # L1Billing's part starts at the handoff
    assert "replied" in reply["msg"]
    assert any("stopped:" in r["msg"] for r in triage)  # the shutdown tally, also JSON


def _json_log_service(nats_server: NatsServer, tmp_path: Path, *, name: str) -> Proc:
    """``convlog log`` with JSON logs and metrics on a free port; not started."""
    return Proc([sys.executable, "-m", "services.cli.main", "log", "--nats-url", nats_server.url,
                 "--db", str(tmp_path / "log.db"), "--no-embedded", "--metrics-port", "0"],
                log_dir=tmp_path, env=_json_env(tmp_path), name=name)


def _json_env(tmp_path: Path) -> dict[str, str]:
    return {**service_env(tmp_path / "data"), "CONVLOG_LOG_FORMAT": "json"}


async def test_log_service_logs_json_and_a_bad_format_is_refused(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    proc = _json_log_service(nats_server, tmp_path, name="log-json")
    with proc:
        proc.wait_for_line(READY_LINE, timeout=20)
        proc.wait_for_line(r"log service metrics on http", timeout=5)
    assert proc.returncode == 0
    records = json_lines(proc)
    assert any(r["msg"].startswith("log service ready") for r in records)
    assert any(r["msg"].startswith("log service stopped") for r in records)

    env = {**_json_env(tmp_path), "CONVLOG_LOG_FORMAT": "xml"}
    code, out, err = await run_cli("log", "--nats-url", nats_server.url, "--no-embedded", env=env)
    assert code == 2
    assert "CONVLOG_LOG_FORMAT='xml' is invalid: expected one of text, json" in err


# A scraper that resets its connection before sending a whole request (a timeout, a port
# scanner, a load balancer's probe): socketserver printed its traceback to stderr as ~14
# lines of text, in the middle of the JSON lines.
async def test_a_metrics_client_that_hangs_up_writes_no_text_into_json_logs(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    proc = _json_log_service(nats_server, tmp_path, name="log-json-reset")
    with proc:
        proc.wait_for_line(READY_LINE, timeout=20)
        port = int(proc.wait_for_line(r"log service metrics on http://[^:]+:(\d+)/metrics", timeout=5).group(1))
        await asyncio.to_thread(_hang_up, port, times=3)
    assert proc.returncode == 0
    records = json_lines(proc)
    assert any(r["msg"].startswith("log service stopped") for r in records)


# The line saying why `convlog log` gave up was printed as plain text: with JSON logs a
# shipper could not parse the one line that mattered most.
async def test_the_error_a_command_ends_with_is_a_json_line(tmp_path: Path) -> None:
    env = _json_env(tmp_path)
    url = f"nats://127.0.0.1:{free_port()}"
    code, out, err = await run_cli("log", "--nats-url", url, "--no-embedded", "--db", str(tmp_path / "log.db"),
                                   "--start-wait", "0", env=env)
    assert code == 3, err
    (record,) = [json.loads(line) for line in err.splitlines()]
    assert record["level"] == "ERROR"
    assert record["msg"].startswith(f"convlog log: unavailable: no NATS server answers at {url}"), record


def _hang_up(port: int, *, times: int) -> None:
    """Start a request to ``port`` and reset the connection, ``times`` times."""
    for _ in range(times):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET /metr")
            time.sleep(0.2)  # the server is reading the request line
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close: RST
    time.sleep(0.5)


# A bad setting next to CONVLOG_LOG_FORMAT=json (a typo in the env file a unit reads) was
# said in plain text: the line saying why the service did not start was the only one a
# shipper could not parse.
async def test_a_configuration_error_is_a_json_line(tmp_path: Path) -> None:
    env = {**_json_env(tmp_path), "CONVLOG_COMMIT_BATCH": "0"}
    code, out, err = await run_cli("log", "--no-embedded", "--db", str(tmp_path / "log.db"), env=env)
    assert code == 2, err
    (record,) = [json.loads(line) for line in err.splitlines()]
    assert record["level"] == "ERROR"
    assert record["msg"].startswith("convlog log: configuration error: CONVLOG_COMMIT_BATCH='0' is invalid"), record
