"""``deploy/``'s cluster layout: two log services on the JetStream store
against the 3-node cluster of ``deploy/nats/cluster-{1,2,3}.conf``.

* ``supervisord-cluster.conf`` parses with supervisor's own options (two log
  programs with their own data directories, one worker per agent, the health
  watcher; the JetStream store, R3, the three servers' URLs) and really runs:
  against the three cluster configs on free ports, both log services answer,
  the stream is R3 and a message sent is answered.
* ``convlog-log@.service`` and ``convlog-nats@.service`` start commands convlog's
  parser and ``nats-server -t`` accept, with the same store, replicas and URLs;
  ``cluster.env`` says the same; the worker unit pulls in neither layout's
  nats-server (a ``Wants=convlog-nats.service`` would start the single node on
  the cluster's port).
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import nats
import pytest

from services.bench.leader import store_streams
from services.cli.supervise import Supervisor
from shared.client import LogClient
from tests.support.cluster_load import appends_served
from tests.support.deploy_config import (
    AGENTS,
    DEPLOY,
    parse_convlog,
    supervisor_options,
    systemd_verify,
)
from tests.support.eventually import assert_eventually
from tests.support.natsd import NatsServer, free_port, nats_server_binary
from tests.support.procs import REPO_ROOT, offline_env
from tests.support.systemd_unit import read_unit

BIN = str(Path(sys.executable).parent)


def _client_ports() -> list[int]:
    ports = []
    for i in (1, 2, 3):
        m = re.search(r"^listen:\s*127\.0\.0\.1:(\d+)", (DEPLOY / "nats" / f"cluster-{i}.conf").read_text(), re.M)
        assert m, f"cluster-{i}.conf has no client listen address"
        ports.append(int(m.group(1)))
    return ports


CLUSTER_URL = ",".join(f"nats://127.0.0.1:{p}" for p in _client_ports())
README_CLUSTER = (REPO_ROOT / "README.md").read_text().split("## Running on a cluster", 1)[1].split("\n## ", 1)[0]


# -- supervisord -------------------------------------------------------------------


def test_supervisord_cluster_conf_runs_two_jetstream_log_services(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVLOG_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CONVLOG_LOG_DIR", str(tmp_path / "logs"))
    (tmp_path / "logs").mkdir()
    opts = supervisor_options(DEPLOY / "supervisord-cluster.conf")
    groups = {g.name: {p.name: p for p in g.process_configs} for g in opts.process_group_configs}
    assert set(groups) == {"log", "health", "workers"}  # the workers stop together, as one group
    assert set(groups["workers"]) == {f"worker-{a}" for a in AGENTS}
    env = opts.configroot.supervisord.environment
    assert env["CONVLOG_NATS_URL"] == CLUSTER_URL
    assert (env["CONVLOG_STORE"], env["CONVLOG_STREAM_REPLICAS"], env["CONVLOG_EMBEDDED"]) == ("jetstream", "3", "false")
    logs = groups["log"]
    assert sorted(logs) == ["log-1", "log-2"]
    dirs = {p.environment["CONVLOG_DATA_DIR"] for p in logs.values()}
    assert dirs == {str(tmp_path / "data" / "log-1"), str(tmp_path / "data" / "log-2")}
    for name, p in logs.items():
        args = parse_convlog(shlex.split(p.command)[1:])
        assert (args.command, args.store) == ("log", "jetstream"), name
        assert p.stdout_logfile == str(tmp_path / "logs" / f"{name}.log")
    for group in groups.values():
        for p in group.values():
            assert p.autorestart is not False and p.stopsignal == 15 and p.stopwaitsecs >= 10, p.name
    for agent in AGENTS:
        args = parse_convlog(shlex.split(groups["workers"][f"worker-{agent}"].command)[1:])
        assert (args.command, args.agent) == ("worker", agent)


async def test_supervisord_cluster_conf_serves_on_the_cluster_configs(short_tmp: Path) -> None:
    # Step 1: the three nodes from deploy/nats/cluster-N.conf, on free ports.
    ports = {p: free_port() for p in [*_client_ports(), 6222, 6223, 6224]}

    def remap(text: str) -> str:
        for old, new in ports.items():
            text = text.replace(f"127.0.0.1:{old}", f"127.0.0.1:{new}")
        return text

    servers = []
    for i in (1, 2, 3):
        text = remap((DEPLOY / "nats" / f"cluster-{i}.conf").read_text())
        text = re.sub(r'store_dir:\s*"[^"]*"', f'store_dir: "{short_tmp / f"nats-{i}"}"', text)
        text = re.sub(r"^http:.*$", "", text, flags=re.M)
        servers.append(NatsServer(short_tmp / f"n{i}", jetstream=False, config=text,
                                  port=ports[_client_ports()[i - 1]]))  # the flag would win over the config
    # Step 2: supervisord-cluster.conf with the same ports, next to agents.toml as in deploy/.
    conf = short_tmp / "supervisord-cluster.conf"
    conf.write_text(remap((DEPLOY / "supervisord-cluster.conf").read_text()))
    shutil.copy(DEPLOY / "agents.toml", short_tmp / "agents.toml")
    data, logs = short_tmp / "data", short_tmp / "logs"
    data.mkdir()
    logs.mkdir()
    env = offline_env()
    # this interpreter's scripts (convlog) first on PATH
    env.update(PATH=BIN + os.pathsep + env.get("PATH", ""), PYTHONUNBUFFERED="1",
               CONVLOG_DATA_DIR=str(data), CONVLOG_LOG_DIR=str(logs))
    sup = Supervisor(conf, logs / "supervisor.sock", env=env, output=short_tmp / "supervisord.out")
    url = remap(CLUSTER_URL)
    try:
        for s in servers:
            await asyncio.to_thread(s.start)
        await asyncio.to_thread(sup.start)
        # Step 3: healthy: a log service answers and every agent's worker consumes.
        health = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.cli.main", "health", "--wait", "90", "--agents",
            str(DEPLOY / "agents.toml"), "--nats-url", url, "--no-embedded",
            env=env, cwd=REPO_ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(health.communicate(), 120)
        assert health.returncode == 0, out.decode() + (logs / "log-1.log").read_text()[-2000:]
        # Step 4: both log services serve, the log is R3, a message is answered.
        assert len(await appends_served(url)) == 2
        nc = await nats.connect(url.split(","))
        try:
            assert all(s.replicas == 3 for s in await store_streams(nc.jetstream(timeout=5), "convlog"))
        finally:
            await nc.close()
        async with await LogClient.connect(url) as client:
            await client.send("deploy-cluster", "Hi, I was charged twice for my subscription this month.")

            async def answered() -> None:
                items = await client.items("deploy-cluster")
                assert any(e.item_id.endswith(".reply") and e.agent == "L1Billing" for e in items), items

            await assert_eventually(answered, timeout=60, interval=0.2)
    finally:
        await asyncio.to_thread(sup.stop)
        for s in servers:
            await asyncio.to_thread(s.stop)


# -- systemd -----------------------------------------------------------------------




def _environment(unit: dict[str, dict[str, list[str]]]) -> dict[str, str]:
    return dict(e.split("=", 1) for e in unit["Service"].get("Environment", []))


def test_systemd_log_template_runs_the_jetstream_store_against_the_cluster() -> None:
    u = read_unit(DEPLOY / "systemd" / "convlog-log@.service")
    env = _environment(u)
    assert env["CONVLOG_STORE"] == "jetstream" and env["CONVLOG_STREAM_REPLICAS"] == "3"
    assert env["CONVLOG_NATS_URL"] == CLUSTER_URL
    assert env["CONVLOG_DATA_DIR"] == "/var/lib/convlog/log-%i"  # one per instance
    (exec_start,) = u["Service"]["ExecStart"]
    argv = shlex.split(exec_start)
    assert Path(argv[0]).name == "convlog"
    args = parse_convlog(argv[1:])
    assert (args.command, args.store) == ("log", "jetstream")
    assert u["Service"]["Restart"] == ["always"] and u["Service"]["KillSignal"] == ["SIGTERM"]
    assert all(f"convlog-nats@{i}.service" in " ".join(u["Unit"]["After"]) for i in (1, 2, 3))


@pytest.mark.parametrize("node", ["1", "2", "3"])
def test_systemd_nats_template_starts_each_cluster_config(node: str) -> None:
    u = read_unit(DEPLOY / "systemd" / "convlog-nats@.service")
    (exec_start,) = u["Service"]["ExecStart"]
    argv = shlex.split(exec_start.replace("%i", node))
    assert Path(argv[0]).name == "nats-server"
    conf = Path(argv[argv.index("-c") + 1])
    assert conf == Path(f"/etc/convlog/nats/cluster-{node}.conf")
    res = subprocess.run([nats_server_binary(), "-t", "-c", str(DEPLOY / "nats" / conf.name)],
                         capture_output=True, text=True, timeout=30, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "sync_interval: always" in (DEPLOY / "nats" / conf.name).read_text()


def test_cluster_env_matches_the_units_and_the_worker_pulls_in_no_server() -> None:
    env = dict(line.split("=", 1) for line in (DEPLOY / "cluster.env").read_text().splitlines()
               if line.strip() and not line.startswith("#"))
    assert env == {"CONVLOG_NATS_URL": CLUSTER_URL, "CONVLOG_STORE": "jetstream", "CONVLOG_STREAM_REPLICAS": "3"}
    worker = read_unit(DEPLOY / "systemd" / "convlog-worker@.service")
    assert "Wants" not in worker["Unit"] and "Requires" not in worker["Unit"]
    # cluster.env is the convlog.env it reads first (then only its own NATS login)
    assert worker["Service"]["EnvironmentFile"][0] == "-/etc/convlog/convlog.env"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verifies_the_cluster_units(tmp_path: Path) -> None:
    units = []
    for name, instance in (("convlog-log@.service", "convlog-log@1.service"),
                           ("convlog-nats@.service", "convlog-nats@1.service")):
        text = (DEPLOY / "systemd" / name).read_text().replace("/opt/convlog/venv/bin", BIN)
        (tmp_path / instance).write_text(text)
        units.append(str(tmp_path / instance))
    systemd_verify(units)


def _authorization_block() -> str:
    """``deploy/nats/auth.conf``'s ``authorization { ... }`` block (its per-role users)."""
    text = (DEPLOY / "nats" / "auth.conf").read_text()
    start = text.index("\nauthorization {") + 1
    depth = 0
    for i, ch in enumerate(text[start:], start):
        depth += ch == "{"
        depth -= ch == "}"
        if ch == "}" and depth == 0:
            return text[start:i + 1]
    raise AssertionError("auth.conf's authorization block does not close")


@pytest.mark.parametrize("node", ["1", "2", "3"])
def test_systemd_nats_template_can_run_a_cluster_node_with_the_per_role_users(node: str, tmp_path: Path) -> None:
    # The README's cluster section says per-role users (auth.conf) keep their passwords in
    # /etc/convlog/nats.env, "for nats-server". convlog-nats.service reads it; the cluster's
    # convlog-nats@.service read no environment file at all, so a node whose config has
    # auth.conf's users refused to start ("variable reference ... can not be found") and
    # the cluster never formed.
    from tests.docs.test_deploy import PASSWORDS

    u = read_unit(DEPLOY / "systemd" / "convlog-nats@.service")
    header = (DEPLOY / "systemd" / "convlog-nats@.service").read_text().split("\n[Unit]")[0]
    nats_env = "/etc/convlog/nats.env"
    assert nats_env in README_CLUSTER, "the README's cluster section no longer names nats.env"
    local = tmp_path / "nats.env"
    local.write_text("".join(f"{k}={v}\n" for k, v in PASSWORDS.items()))
    env = {"PATH": "/usr/bin:/bin"}
    env.update(_environment(u))
    for name in u["Service"].get("EnvironmentFile", []):
        if name.removeprefix("-") == nats_env:
            env.update(line.split("=", 1) for line in local.read_text().splitlines())
    (exec_start,) = u["Service"]["ExecStart"]
    argv = shlex.split(exec_start.replace("%i", node))
    conf = tmp_path / Path(argv[argv.index("-c") + 1]).name
    conf.write_text((DEPLOY / "nats" / conf.name).read_text() + "\n" + _authorization_block() + "\n")
    res = subprocess.run([nats_server_binary(), "-t", "-c", str(conf)], env=env,
                         capture_output=True, text=True, timeout=30, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    # ...and with no password file the node is refused, as the single node is: the passwords
    # are the file's, not the config's.
    res = subprocess.run([nats_server_binary(), "-t", "-c", str(conf)], env={"PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=30, check=False)
    assert res.returncode != 0, res.stdout + res.stderr
    assert nats_env in header, "convlog-nats@.service's header does not say where the passwords go"
