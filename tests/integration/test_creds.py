"""Logging in with a NATS credentials file (``--creds`` / ``CONVLOG_CREDS``)
to a real nats-server in operator mode: the operator, account and user keys
and JWTs are made in the test (tests/support/nats_jwt.py), the server trusts
the operator and has the accounts preloaded in memory.

``convlog log`` serves with the service user's creds file and ``convlog
sessions`` reads with another user's; a connection without credentials is
refused, and a wrong creds file ends in one line, not a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import nats
import nats.errors
import pytest

from shared.client import LogClient
from shared.config import load_settings
from tests.support.nats_jwt import Operator
from tests.support.natsd import NatsServer, free_port
from tests.support.procs import python_module, run_cli, service_env


def cli_env(tmp: Path) -> dict[str, str]:
    return service_env(tmp / "cli-data")


async def convlog(tmp: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    return await run_cli(*args, env=env or cli_env(tmp))


def write_creds(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


@pytest.fixture
def operator_server(nats_server_factory: Callable[..., NatsServer]) -> tuple[NatsServer, Operator]:
    """A JetStream nats-server trusting a fresh operator with accounts APP and SYS."""
    op = Operator.create("convlog-test")
    op.account("APP", jetstream=True)
    op.account("SYS")
    return nats_server_factory(config=op.server_config(system="SYS")), op


async def test_convlog_logs_in_with_a_creds_file(operator_server: tuple[NatsServer, Operator], tmp_path: Path) -> None:
    server, op = operator_server
    app = op.accounts["APP"]
    service_creds = write_creds(tmp_path / "service.creds", app.user("log-service").creds())
    reader_creds = write_creds(tmp_path / "reader.creds", app.user("auditor").creds())

    # The server is in operator mode: no credentials, no connection.
    with pytest.raises((nats.errors.Error, OSError)):
        await nats.connect(server.url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2)

    log_svc = python_module(
        "services.cli.main", "log", "--nats-url", server.url, "--db", str(tmp_path / "log.db"),
        log_dir=tmp_path, env={**cli_env(tmp_path), "CONVLOG_CREDS": str(service_creds)},
    )
    with log_svc:
        await asyncio.to_thread(log_svc.wait_for_line, r"log service ready", 20)

        settings = load_settings({"nats_url": server.url, "creds": str(reader_creds)}, environ={})
        client = await LogClient.connect(settings=settings)
        try:
            ack = await client.append("creds-1", [{"agent": "user", "data": {"role": "user", "content": "hi"}}])
            assert ack.last_order == 1
        finally:
            await client.close()

        rc, out, err = await convlog(tmp_path, "sessions", "--nats-url", server.url, "--creds", str(reader_creds))
        assert rc == 0, err
        assert [line.split()[:2] for line in out.splitlines()[1:]] == [["creds-1", "1"]]


async def test_a_wrong_creds_file_is_one_line(operator_server: tuple[NatsServer, Operator], tmp_path: Path) -> None:
    server, _ = operator_server
    # Well-formed, but signed by an account the server does not know.
    stranger = Operator.create("someone-else").account("ELSEWHERE").user("mallory")
    cases = {
        "untrusted": write_creds(tmp_path / "untrusted.creds", stranger.creds()),
        "garbage": write_creds(tmp_path / "garbage.creds", "this is not a creds file\n"),
        "missing": tmp_path / "missing.creds",
    }
    for name, creds in cases.items():
        rc, out, err = await convlog(tmp_path, "sessions", "--nats-url", server.url, "--creds", str(creds))
        lines = err.strip().splitlines()
        assert rc != 0 and "Traceback" not in err, (name, err)
        assert len(lines) == 1 and lines[0].startswith("convlog sessions: "), (name, err)
        assert out == "", (name, out)
    # Servers that do not answer, tried before the one that refuses: still one line.
    dead = ",".join(f"nats://127.0.0.1:{free_port()}" for _ in range(3))
    rc, _, err = await convlog(tmp_path, "sessions", "--nats-url", f"{dead},{server.url}",
                               "--creds", str(cases["untrusted"]))
    assert rc != 0 and err.strip().splitlines() == [err.strip()], err
    assert "NATS refused the connection (CONVLOG_CREDS=" in err, err
    assert "NATS refused the connection (CONVLOG_CREDS=" in err_of(await convlog(
        tmp_path, "sessions", "--nats-url", server.url, "--creds", str(cases["untrusted"])))
    assert "not a NATS credentials file" in err_of(await convlog(
        tmp_path, "sessions", "--nats-url", server.url, "--creds", str(cases["garbage"])))

    # The log service gives up at start-up too, instead of retrying forever.
    rc, _, err = await convlog(
        tmp_path, "log", "--nats-url", server.url, "--db", str(tmp_path / "log.db"),
        "--creds", str(cases["untrusted"]),
    )
    assert rc == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("convlog log: NATS refused the connection"), err

    # health said "no server answers" of a server that answered and refused the login.
    rc, out, err = await convlog(tmp_path, "health", "--nats-url", server.url, "--no-embedded",
                                 "--creds", str(cases["untrusted"]))
    assert rc == 1, (out, err)
    assert f"NATS at {server.url}: NATS refused the connection (CONVLOG_CREDS=" in out + err, (out, err)
    assert "no server answers" not in out + err, (out, err)


def err_of(result: tuple[int, str, str]) -> str:
    return result[2]


@contextlib.asynccontextmanager
async def _log_service_with_creds(server: NatsServer, op: Operator, tmp_path: Path) -> AsyncIterator[Path]:
    """A `convlog log` process logged in with creds of account APP; yields a bench user's creds."""
    app = op.accounts["APP"]
    service_creds = write_creds(tmp_path / "service.creds", app.user("log-service").creds())
    bench_creds = write_creds(tmp_path / "bench.creds", app.user("bench").creds())
    log_svc = python_module(
        "services.cli.main", "log", "--nats-url", server.url, "--db", str(tmp_path / "log.db"),
        log_dir=tmp_path, env={**cli_env(tmp_path), "CONVLOG_CREDS": str(service_creds)},
    )
    with log_svc:
        await asyncio.to_thread(log_svc.wait_for_line, r"log service ready", 20)
        yield bench_creds


async def test_the_sdk_bench_logs_in_with_the_creds_given(
    operator_server: tuple[NatsServer, Operator], tmp_path: Path
) -> None:
    # --creds was ignored by `convlog bench --sdk --nats-url URL`: its client, its stats
    # connection and its four writer processes connected without credentials, so against
    # a server with JWT auth the bench failed ('Authorization Violation').
    pytest.importorskip("agents")
    server, op = operator_server
    async with _log_service_with_creds(server, op, tmp_path) as bench_creds:
        rc, out, err = await run_cli("bench", "--sdk", "--sdk-ops", "4", "--json", "--nats-url", server.url,
                                     "--creds", str(bench_creds), env=cli_env(tmp_path), timeout=180)
        assert rc == 0, err[-2000:]
        assert json.loads(out)["scenarios"]["processes"]["convlog"]["found"] == 4 * 2

        settings = load_settings({"nats_url": server.url, "creds": str(bench_creds)}, environ={})
        client = await LogClient.connect(settings=settings)
        try:
            sessions = [s.session_id for s in (await client.sessions()).sessions]
        finally:
            await client.close()
        assert any(s.startswith("sdkbench-") for s in sessions), sessions


async def test_the_bench_logs_in_with_the_creds_given(
    operator_server: tuple[NatsServer, Operator], tmp_path: Path
) -> None:
    # --creds was ignored by `convlog bench --nats-url URL`: its client and its echo
    # baseline connected without credentials ('NATS refused the connection (no
    # credentials)', exit 2) against a server with JWT auth.
    server, op = operator_server
    async with _log_service_with_creds(server, op, tmp_path) as bench_creds:
        rc, out, err = await run_cli("bench", "--nats-url", server.url, "--creds", str(bench_creds), "--json",
                                     "--writers", "2", "--sessions", "2", "--duration", "0.3",
                                     "--replay-items", "500", env=cli_env(tmp_path), timeout=120)
        assert rc == 0, err[-2000:]
        results = json.loads(out)["results"]
        assert results["baseline"]["ops"] > 0 and results["append"]["ops"] > 0
