"""CONVLOG_STREAM_REPLICAS=3 on a server that is not clustered, with the
JetStream store: the README says ``convlog log`` exits 2 naming the setting
(as it does on the SQLite store, test_cli_mistakes)."""

from __future__ import annotations

from pathlib import Path

from tests.integration.test_cli_mistakes import EXIT_USAGE, cli_env, convlog
from tests.support.natsd import NatsServer


async def test_replicated_log_streams_on_one_server_exit_2_naming_the_setting(
    nats_server: NatsServer, tmp_path: Path,
) -> None:
    env = cli_env(tmp_path, CONVLOG_NATS_URL=nats_server.url, CONVLOG_STREAM_REPLICAS="3",
                  CONVLOG_STORE="jetstream")
    rc, out, err = await convlog(tmp_path, "log", env=env)
    lines = [x for x in err.splitlines() if x.startswith("convlog log:")]
    assert rc == EXIT_USAGE, (rc, lines or err[-2000:])
    assert "CONVLOG_STREAM_REPLICAS" in lines[0], lines
