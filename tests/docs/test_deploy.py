"""Every file in ``deploy/`` loads, and says what the rest of the repository does.

* nats configs pass ``nats-server -t``; the 3 cluster configs form a JetStream
  cluster that places an R3 stream; ``auth.conf``'s users get exactly the
  subjects DESIGN.md gives their role (a client can send and read but not
  append as an agent).
* ``supervisord.conf`` is parsed by supervisor's own ``ServerOptions``: one
  program per process, autorestart, TERM, log files under ``CONVLOG_LOG_DIR``;
  the config ``convlog up`` generates has the same programs.
* the health check runs ``convlog health`` from supervisord as a watcher
  program (the systemd units and the Procfile: ``test_deploy_units.py``).
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import nats
import pytest
from supervisor.options import ServerOptions

from services.cli.stack_cmds import up_config
from services.cli.supervise import render_config, stack_programs
from services.worker.scenario import SEED_CONVERSATION
from shared.client import LogClient
from shared.config import load_settings
from shared.errors import BadRequestError
from tests.support.deploy_config import (
    AGENTS,
    DEPLOY,
    nats_flags_are_valid,
    parse_convlog,
    supervisor_options,
)
from tests.support.eventually import assert_eventually
from tests.support.natsd import NatsServer, free_port, nats_server_binary
from tests.support.procs import REPO_ROOT, Proc, run_cli

PASSWORDS = {
    "CONVLOG_NATS_LOG_PASSWORD": "log-secret",
    "CONVLOG_NATS_WORKER_PASSWORD": "worker-secret",
    "CONVLOG_NATS_CLIENT_PASSWORD": "client-secret",
}


def test_reference_agents_are_the_seeds() -> None:
    assert AGENTS == ["Triage", "L1Billing", "L1Technical", "L2Support"]


# -- nats ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["single.conf", "cluster-1.conf", "cluster-2.conf",
                                  "cluster-3.conf", "auth.conf"])
def test_nats_config_is_valid(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in PASSWORDS.items():
        monkeypatch.setenv(k, v)
    path = DEPLOY / "nats" / name
    res = subprocess.run([nats_server_binary(), "-t", "-c", str(path)],
                         capture_output=True, text=True, timeout=30, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "is valid" in res.stdout + res.stderr
    text = path.read_text()
    assert "jetstream" in text
    # loopback only: every listen address is 127.0.0.1
    for addr in re.findall(r"^\s*(?:listen|http):\s*(\S+)", text, re.M):
        assert addr.startswith("127.0.0.1:"), f"{name}: {addr} is not loopback"


def test_auth_config_refuses_to_start_without_its_passwords(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in PASSWORDS:
        monkeypatch.delenv(k, raising=False)
    res = subprocess.run([nats_server_binary(), "-t", "-c", str(DEPLOY / "nats" / "auth.conf")],
                         capture_output=True, text=True, timeout=30, check=False)
    assert res.returncode != 0
    assert "CONVLOG_NATS_LOG_PASSWORD" in res.stdout + res.stderr


def _for_test(text: str, store: Path, ports: dict[int, int] | None = None) -> str:
    """A deploy nats config moved to a temp store, ephemeral ports, no monitoring port."""
    text = re.sub(r'store_dir:\s*"[^"]*"', f'store_dir: "{store}"', text)
    text = re.sub(r"^http:.*$", "", text, flags=re.M)
    for old, new in (ports or {}).items():
        text = text.replace(f"127.0.0.1:{old}", f"127.0.0.1:{new}")
    return text


async def test_cluster_configs_form_a_jetstream_cluster(tmp_path: Path) -> None:
    # Step 1: the three node configs, route ports moved to free ones, started together.
    routes = {6222 + i: free_port() for i in range(3)}
    servers = [
        NatsServer(tmp_path / f"n{i}", jetstream=False,  # JetStream comes from the config
                   config=_for_test((DEPLOY / "nats" / f"cluster-{i}.conf").read_text(),
                                    tmp_path / f"n{i}" / "js", routes))
        for i in (1, 2, 3)
    ]
    try:
        for s in servers:
            s.start()
        nc = await nats.connect([s.url for s in servers], connect_timeout=2)
        try:
            js = nc.jetstream(timeout=2)

            # Step 2: a meta leader is elected and an R3 stream can be placed.
            async def r3_stream() -> None:
                try:
                    await js.add_stream(name="probe", subjects=["probe"], num_replicas=3)
                except Exception as e:  # not ready yet
                    raise AssertionError(repr(e)) from e

            await assert_eventually(r3_stream, timeout=30, interval=0.3)
            info = await js.stream_info("probe")
            assert info.config.num_replicas == 3
            assert info.cluster is not None and info.cluster.name == "convlog"
        finally:
            await nc.close()
    finally:
        for s in servers:
            s.stop()


def _auth_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[NatsServer, dict[str, str]]:
    """A nats-server on ``auth.conf`` (its passwords set), and the log user's environment."""
    for k, v in PASSWORDS.items():
        monkeypatch.setenv(k, v)
    text = _for_test((DEPLOY / "nats" / "auth.conf").read_text(), tmp_path / "js")
    server = NatsServer(tmp_path / "nats", jetstream=False, config=text).start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVLOG_")}
    env.update(CONVLOG_USER="log", CONVLOG_PASSWORD=PASSWORDS["CONVLOG_NATS_LOG_PASSWORD"],
               CONVLOG_DATA_DIR=str(tmp_path), CONVLOG_EMBEDDED="false")
    return server, env


async def test_auth_config_runs_the_stack_with_each_role_on_its_subjects(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, env = _auth_server(tmp_path, monkeypatch)
    # Step 1: the log service runs as the `log` user (stream, bucket, micro endpoints).
    svc = Proc([sys.executable, "-m", "services.cli.main", "log", "--nats-url", server.url,
                "--db", str(tmp_path / "convlog.db"), "--no-embedded"],
               log_dir=tmp_path, env=env, name="log-as-log-user").start()
    procs = [svc]
    try:
        svc.wait_for_line("log service ready", timeout=30)
        errors: list[str] = []

        async def on_error(e: Exception) -> None:
            errors.append(str(e))

        # Step 2: a `client` sends a user message, reads and lists sessions.
        settings = load_settings({"nats_url": server.url}, environ={})
        client = await LogClient.connect(settings=settings, name="t-client", user="client",
                                         password=PASSWORDS["CONVLOG_NATS_CLIENT_PASSWORD"],
                                         error_cb=on_error)
        try:
            ack = await client.send("auth-s1", "hello")
            assert ack.first_order == 1
            assert [e.data["content"] for e in await client.items("auth-s1")] == ["hello"]
            assert [s.session_id for s in (await client.sessions()).sessions] == ["auth-s1"]
            # Step 3: ... but may not append as an agent: the server refuses the publish.
            with pytest.raises(nats.errors.TimeoutError):
                await client.nc.request("convlog.append.auth-s1", msgspec.json.encode(
                    {"items": [{"agent": "Triage", "data": {"role": "assistant", "content": "x"}}]}),
                    timeout=1)
            await assert_eventually(lambda: _violation(errors, "convlog.append.auth-s1"), timeout=5)
        finally:
            await client.close()

        # Step 4: a `worker` appends and reads, but cannot pose as the user.
        errors.clear()
        worker = await LogClient.connect(settings=settings, name="t-worker", user="worker",
                                         password=PASSWORDS["CONVLOG_NATS_WORKER_PASSWORD"],
                                         error_cb=on_error)
        try:
            rep = await worker.append("auth-s1", [{"agent": "Triage", "data": {
                "type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "hi"}]}}])
            assert rep.first_order == 2
            assert await worker.last_order("auth-s1") == 2
            await worker.nc.publish("convlog.in.auth-s1", b'{"content": "spoof"}')
            await assert_eventually(lambda: _violation(errors, "convlog.in.auth-s1"), timeout=5)
        finally:
            await worker.close()

        # Step 5: the agent workers run as `worker`; a `client` gets the seed's first answer.
        wenv = {**env, "CONVLOG_USER": "worker",
                "CONVLOG_PASSWORD": PASSWORDS["CONVLOG_NATS_WORKER_PASSWORD"]}
        wenv.pop("OPENAI_API_KEY", None)
        for agent in AGENTS:
            procs.append(Proc([sys.executable, "-m", "services.cli.main", "worker", agent,
                               "--agents", str(DEPLOY / "agents.toml"), "--nats-url", server.url,
                               "--no-embedded"], log_dir=tmp_path, env=wenv,
                              name=f"worker-{agent}").start())
        for proc in procs[1:]:
            proc.wait_for_line(r"worker \S+ ready", timeout=60)
        client = await LogClient.connect(settings=settings, name="t-client2", user="client",
                                         password=PASSWORDS["CONVLOG_NATS_CLIENT_PASSWORD"])
        try:
            await client.send("auth-s2", SEED_CONVERSATION[0])

            async def answered() -> list[str]:
                items = await client.items("auth-s2")
                assert any(e.item_id.endswith(".reply") for e in items), [e.item_id for e in items]
                return [e.agent for e in items]

            assert await assert_eventually(answered, timeout=60, interval=0.2) == [
                "user", "Triage", "Triage", "L1Billing"]
        finally:
            await client.close()
    finally:
        for proc in procs:
            proc.terminate()
        server.stop()
    for proc in procs:
        assert "permissions violation" not in proc.output().lower(), proc.output()
    # The server refused exactly the two publishes this test tried on purpose.
    refused = re.findall(r'Violation - Subject "([^"]+)"', server.log_text())
    assert sorted(set(refused)) == ["convlog.append.auth-s1", "convlog.in.auth-s1"], refused


async def test_auth_config_lets_the_log_user_run_the_jetstream_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The JetStream store writes its own log streams (convlog.log.>): the `log` user may.
    server, env = _auth_server(tmp_path, monkeypatch)
    env["CONVLOG_STORE"] = "jetstream"
    svc = Proc([sys.executable, "-m", "services.cli.main", "log", "--nats-url", server.url, "--no-embedded"],
               log_dir=tmp_path, env=env, name="log-js-as-log-user").start()
    try:
        svc.wait_for_line("log service ready", timeout=30)
        settings = load_settings({"nats_url": server.url}, environ={})
        worker = await LogClient.connect(settings=settings, name="t-worker", user="worker",
                                         password=PASSWORDS["CONVLOG_NATS_WORKER_PASSWORD"])
        try:
            rep = await worker.append("auth-js", [{"agent": "Triage", "data": {
                "type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "hi"}]}}])
            assert rep.first_order == 1
            assert [e.agent for e in await worker.items("auth-js")] == ["Triage"]
        finally:
            await worker.close()
    finally:
        svc.terminate()
        server.stop()
    assert "permissions violation" not in svc.output().lower(), svc.output()
    assert "Violation" not in server.log_text(), server.log_text()


async def test_auth_config_lets_a_client_replay_and_verify_a_session_with_its_signed_heads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `convlog replay` (and the console's export) read the witness head in the KV bucket
    # convlog_heads: the `client` role ("may ... read") could not, and replay failed after
    # 5 s with "nats: timeout" (exit 1) on a permissions violation.
    from services.cli.keys_cmds import make_keys

    server, env = _auth_server(tmp_path, monkeypatch)
    make_keys(tmp_path / "keys", [])
    svc = Proc([sys.executable, "-m", "services.cli.main", "log", "--nats-url", server.url,
                "--db", str(tmp_path / "convlog.db"), "--no-embedded"], log_dir=tmp_path,
               env={**env, "CONVLOG_SIGNING_KEY": str(tmp_path / "keys" / "log.nk")}, name="log-signing").start()
    try:
        svc.wait_for_line("log service ready", timeout=30)
        settings = load_settings({"nats_url": server.url}, environ={})
        client = await LogClient.connect(settings=settings, name="t-client", user="client",
                                         password=PASSWORDS["CONVLOG_NATS_CLIENT_PASSWORD"])
        try:
            await client.send("auth-r1", "hello")
        finally:
            await client.close()
        await asyncio.sleep(1.5)  # CONVLOG_HEAD_INTERVAL: the witness head is in the bucket
        cenv = {**env, "CONVLOG_USER": "client", "CONVLOG_PASSWORD": PASSWORDS["CONVLOG_NATS_CLIENT_PASSWORD"]}
        done = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "services.cli.main", "replay", "auth-r1", "--verify",
                             "--nats-url", server.url, "--no-embedded"],
            env=cenv, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        assert "verified: auth-r1: 1 items" in done.stderr
        assert "signed head at item_order 1" in done.stderr
        assert "violation" not in done.stderr.lower(), done.stderr
        # The worker role may read the log but not that bucket: replay says so in one
        # line, exit 3 (it was "nats: timeout", exit 1; passing the head off as absent
        # would skip the truncation check).
        wenv = {**env, "CONVLOG_USER": "worker", "CONVLOG_PASSWORD": PASSWORDS["CONVLOG_NATS_WORKER_PASSWORD"]}
        done = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "services.cli.main", "replay", "auth-r1", "--verify",
                             "--nats-url", server.url, "--no-embedded"],
            env=wenv, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 3, done.stderr
        assert "cannot read the signed heads in the KV bucket convlog_heads" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr, done.stderr
    finally:
        svc.terminate()
        server.stop()


def _log_service_for_health(server: NatsServer, env: dict[str, str], tmp_path: Path) -> Proc:
    """``convlog log`` as the ``log`` user of ``auth.conf``, ready (the caller terminates it)."""
    svc = Proc([sys.executable, "-m", "services.cli.main", "log", "--nats-url", server.url,
                "--db", str(tmp_path / "convlog.db"), "--no-embedded"], log_dir=tmp_path, env=env,
               name="log-for-health").start()
    try:
        svc.wait_for_line("log service ready", timeout=30)
    except BaseException:
        svc.terminate()
        raise
    return svc


async def test_auth_config_lets_the_log_user_run_convlog_health(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # convlog-health.service reads the log service's environment (convlog.env): it runs as
    # the `log` user, which could not publish $SRV.STATS.convlog-log nor read the log, so a
    # running stack was reported "FAIL log service: no instance answers" (exit 1) forever.
    server, env = _auth_server(tmp_path, monkeypatch)
    svc = _log_service_for_health(server, env, tmp_path)
    try:
        done = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "services.cli.main", "health", "--nats-url", server.url,
                             "--no-embedded"], env=env, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "ok    log service: 1 instance(s) answer" in done.stdout, done.stdout
    finally:
        svc.terminate()
        server.stop()
    assert "Violation" not in server.log_text(), server.log_text()


async def _health_as(user: str, server: NatsServer, env: dict[str, str]) -> tuple[int, str]:
    """``convlog health`` logged in as ``user`` of ``auth.conf``: (exit code, output)."""
    uenv = {**env, "CONVLOG_USER": user,
            "CONVLOG_PASSWORD": PASSWORDS[f"CONVLOG_NATS_{user.upper()}_PASSWORD"]}
    code, out, err = await run_cli("health", "--nats-url", server.url, "--no-embedded", "--window", "1",
                                   env=uenv)
    return code, out + err


async def test_health_names_a_check_the_server_does_not_let_its_user_make(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The `client` role may not ask for $SRV.STATS or list the work stream's consumers:
    # the server refuses the publish and nothing answers.  Health blamed the running log
    # service ("is `convlog log` running?") and JetStream ("is JetStream available?").
    server, env = _auth_server(tmp_path, monkeypatch)
    svc = _log_service_for_health(server, env, tmp_path)
    try:
        code, out = await _health_as("client", server, env)
    finally:
        svc.terminate()
        server.stop()
    assert code == 1, out
    fails = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert len(fails) == 2, out
    assert fails[0].startswith("FAIL  log service: NATS does not let this user publish to "
                               "$SRV.STATS.convlog-log (nats: permissions violation"), out
    assert fails[1].startswith("FAIL  work stream CONVLOG_WORK: NATS does not let this user publish to "
                               "$JS.API.CONSUMER.LIST.CONVLOG_WORK (nats: permissions violation"), out
    assert "is `convlog log` running?" not in out and "is JetStream available?" not in out, out


def _client_env(env: dict[str, str]) -> dict[str, str]:
    return {**env, "CONVLOG_USER": "client", "CONVLOG_PASSWORD": PASSWORDS["CONVLOG_NATS_CLIENT_PASSWORD"]}


async def test_auth_config_lets_a_client_send_to_an_agent_without_waiting_out_a_refused_listing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `send --to AGENT` lists the work stream's consumers (agents whose workers run): the
    # `client` role may not, the server refuses the request and nothing answers, so the
    # command waited out nats-py's 5 s JetStream timeout before sending (5.7 s where 0.7 s).
    server, env = _auth_server(tmp_path, monkeypatch)
    svc = _log_service_for_health(server, env, tmp_path)
    try:
        t0 = time.monotonic()
        code, _, err = await run_cli("send", "to1", "hello", "--to", "Triage", "--timeout", "0.5",
                                     "--nats-url", server.url, "--no-embedded", env=_client_env(env))
        took = time.monotonic() - t0
        assert code == 124 and "sent #1 to to1" in err, err  # no worker here: the turn does not end
        assert took < 2.5, (took, err)
        t0 = time.monotonic()
        code, _, err = await run_cli("send", "to2", "hello", "--to", "Nobody",
                                     "--nats-url", server.url, "--no-embedded", env=_client_env(env))
        took = time.monotonic() - t0
        assert code == 2 and "--to 'Nobody': no such agent" in err, err
        assert took < 2.0, (took, err)
    finally:
        svc.terminate()
        server.stop()


async def test_auth_config_client_commands_say_no_warning_of_the_jetstream_api_they_may_not_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The `client` role may not use the JetStream API (list the work stream's consumers,
    # create the consumer a follower reads live items from): a supported setup, which
    # `send` and `tail` handle by reading the log. Yet each printed nats-py's refusal
    # ("WARNING ... permissions violation for publish to $js.api.stream.names") first.
    server, env = _auth_server(tmp_path, monkeypatch)
    svc = _log_service_for_health(server, env, tmp_path)
    cenv = _client_env(env)
    url = ["--nats-url", server.url, "--no-embedded"]
    try:
        outputs = []
        for args in (["send", "w1", "hello", "--to", "Triage", "--timeout", "0.5"],
                     ["send", "w1", "again", "--timeout", "0.5"]):
            code, _, err = await run_cli(*args, *url, env=cenv)
            assert code == 124 and "sent #" in err, err
            outputs.append(err)
        # tail follows a new item (no consumer: by reading the log), promptly
        tail = asyncio.ensure_future(run_cli("tail", "w1", "--after", "2", "--count", "1", *url, env=cenv))
        await asyncio.sleep(1.5)
        code, _, err = await run_cli("send", "w1", "third", "--timeout", "0.5", *url, env=cenv)
        outputs.append(err)
        t0 = time.monotonic()
        code, out, err = await asyncio.wait_for(tail, 10)
        assert code == 0 and "third" in out, out + err
        assert time.monotonic() - t0 < 2.0
        outputs.append(err)
    finally:
        svc.terminate()
        server.stop()
    for err in outputs:
        assert "WARNING" not in err and "violation" not in err.lower(), err


def _violation(errors: list[str], subject: str) -> None:
    assert any("permissions violation" in e.lower() and subject in e for e in errors), errors


# -- supervisord -------------------------------------------------------------


def _programs(opts: ServerOptions) -> dict[str, object]:
    return {p.name: p for g in opts.process_group_configs for p in g.process_configs}


def test_supervisord_conf_parses_with_one_program_per_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONVLOG_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CONVLOG_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.setenv("CONVLOG_NATS_PORT", "4567")
    (tmp_path / "logs").mkdir()
    opts = supervisor_options(DEPLOY / "supervisord.conf")
    progs = _programs(opts)
    assert set(progs) == {"nats", "log", "health", *(f"worker-{a}" for a in AGENTS)}
    env = opts.configroot.supervisord.environment
    assert env["CONVLOG_NATS_URL"] == "nats://127.0.0.1:4567"
    assert env["CONVLOG_DATA_DIR"] == str(tmp_path / "data")
    assert env["CONVLOG_EMBEDDED"] == "false"
    for name, p in progs.items():
        assert p.autorestart is not False, name
        assert p.stopsignal == 15, name  # TERM
        assert p.stopwaitsecs >= 10, name
        assert p.stdout_logfile == str(tmp_path / "logs" / f"{name}.log")
    nats_argv = shlex.split(progs["nats"].command)
    assert nats_argv[0] == "nats-server"
    assert nats_argv[nats_argv.index("-p") + 1] == "4567"
    assert "-js" in nats_argv and nats_argv[nats_argv.index("-sd") + 1].startswith(str(tmp_path))
    nats_flags_are_valid(nats_argv[1:], tmp_path)
    assert progs["nats"].priority < progs["log"].priority < progs["worker-Triage"].priority
    # nats-server's failed starts end in FATAL, for good (1 + 2 + ... s of backoff): the
    # header says when, and how to start it again, as README does.
    header = (DEPLOY / "supervisord.conf").read_text().split("\n[", 1)[0]
    backoff = sum(range(1, progs["nats"].startretries + 1))
    assert 30 <= backoff <= 90 and "about a minute" in header, backoff
    assert "supervisorctl -c deploy/supervisord.conf start nats" in " ".join(header.split())
    assert "supervisorctl -c deploy/supervisord.conf start nats" in (REPO_ROOT / "README.md").read_text()
    for agent in AGENTS:
        argv = shlex.split(progs[f"worker-{agent}"].command)
        assert argv[0] == "convlog"
        args = parse_convlog(argv[1:])
        assert (args.command, args.agent) == ("worker", agent)
        assert Path(args.agents) == DEPLOY / "agents.toml"
    args = parse_convlog(shlex.split(progs["log"].command)[1:])
    assert args.command == "log" and args.db == str(tmp_path / "data" / "convlog.db")
    args = parse_convlog(shlex.split(progs["health"].command)[1:])
    assert args.command == "health" and args.every > 0
    assert args.wait >= 30  # its first line waits for the stack it starts with (no UNHEALTHY at boot)
    assert Path(args.agents) == DEPLOY / "agents.toml"
    assert progs["health"].priority > progs["worker-Triage"].priority
    # the workers are one group, which supervisord stops at once (one tick, not one per worker)
    groups = {g.name: g for g in opts.process_group_configs}
    assert set(groups) == {"nats", "log", "workers", "health"}
    assert {p.name for p in groups["workers"].process_configs} == {f"worker-{a}" for a in AGENTS}
    assert groups["nats"].priority < groups["log"].priority < groups["workers"].priority < groups["health"].priority


def test_supervisord_conf_names_a_missing_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONVLOG_LOG_DIR", raising=False)
    monkeypatch.setenv("CONVLOG_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CONVLOG_NATS_PORT", "4567")
    res = subprocess.run([sys.executable, "-m", "supervisor.supervisord", "-n", "-c",
                          str(DEPLOY / "supervisord.conf")],
                         capture_output=True, text=True, timeout=30, check=False)
    assert res.returncode != 0
    assert "ENV_CONVLOG_LOG_DIR" in res.stdout + res.stderr


@pytest.mark.parametrize("replicas", [1, 2])
def test_convlog_up_config_has_the_same_programs(tmp_path: Path, replicas: int) -> None:
    settings = load_settings({"nats_url": "nats://127.0.0.1:4999"},
                             environ={"CONVLOG_DATA_DIR": str(tmp_path)})
    path, text = up_config(settings, agents_path=DEPLOY / "agents.toml", agents=AGENTS,
                           workers_per_agent=replicas, start_nats=True)
    assert path == tmp_path.resolve() / "supervisor" / "supervisord.conf"
    path.parent.mkdir(parents=True)
    (tmp_path / "logs").mkdir()
    path.write_text(text)
    opts = supervisor_options(path)
    groups = {g.name: [p.name for p in g.process_configs] for g in opts.process_group_configs}
    assert set(groups) == {"nats", "log", *(f"worker-{a}" for a in AGENTS)}
    for agent in AGENTS:
        expected = [f"worker-{agent}"] if replicas == 1 else [f"worker-{agent}-{i}" for i in range(replicas)]
        assert groups[f"worker-{agent}"] == expected
    progs = _programs(opts)
    assert opts.configroot.supervisord.environment["CONVLOG_NATS_URL"] == "nats://127.0.0.1:4999"
    for p in progs.values():
        assert p.autorestart is not False and p.stopsignal == 15
    nats_argv = shlex.split(progs["nats"].command)
    assert nats_argv[nats_argv.index("-p") + 1] == "4999"
    argv = shlex.split(progs[f"worker-Triage{'-0' if replicas > 1 else ''}"].command)
    assert argv[:3] == [sys.executable, "-m", "services.cli.main"]
    assert parse_convlog(argv[3:]).command == "worker"


@pytest.mark.parametrize("replicas", [1, 2])
def test_convlog_up_gives_each_program_its_own_metrics_port(tmp_path: Path, replicas: int) -> None:
    """Every program of `convlog up` inherited CONVLOG_METRICS_PORT: the first to start
    took the port, every other one logged an error and served no metrics."""
    settings = load_settings({"nats_url": "nats://127.0.0.1:4999"},
                             environ={"CONVLOG_DATA_DIR": str(tmp_path), "CONVLOG_METRICS_PORT": "9464"})
    path, text = up_config(settings, agents_path=DEPLOY / "agents.toml", agents=AGENTS,
                           workers_per_agent=replicas, start_nats=True)
    path.parent.mkdir(parents=True)
    (tmp_path / "logs").mkdir()
    path.write_text(text)
    opts = supervisor_options(path)
    assert opts.configroot.supervisord.environment["CONVLOG_METRICS_PORT"] == ""  # off, unless a flag
    ports = {}
    for name, p in _programs(opts).items():
        argv = shlex.split(p.command)
        if argv[0] == sys.executable:
            ports[name] = parse_convlog(argv[3:]).metrics_port
    assert ports.pop("log") == "9464"
    if replicas == 1:
        assert ports == {f"worker-{a}": str(9465 + i) for i, a in enumerate(AGENTS)}
    else:  # replicas of one program share its command: each takes a free port
        assert set(ports.values()) == {"0"} and len(ports) == len(AGENTS) * replicas
    # 0: each program takes a free port (as each did when they all inherited 0)
    _, text = up_config(load_settings({}, environ={"CONVLOG_DATA_DIR": str(tmp_path), "CONVLOG_METRICS_PORT": "0"}),
                        agents_path=DEPLOY / "agents.toml", agents=AGENTS, workers_per_agent=1, start_nats=False)
    assert text.count("--metrics-port 0") == 1 + len(AGENTS)
    with pytest.raises(BadRequestError, match="past 65535"):
        up_config(load_settings({}, environ={"CONVLOG_DATA_DIR": str(tmp_path), "CONVLOG_METRICS_PORT": "65534"}),
                  agents_path=DEPLOY / "agents.toml", agents=AGENTS, workers_per_agent=1, start_nats=False)


def test_convlog_up_skips_nats_when_one_answers(tmp_path: Path) -> None:
    settings = load_settings({"nats_url": "nats://127.0.0.1:4999"},
                             environ={"CONVLOG_DATA_DIR": str(tmp_path)})
    _, text = up_config(settings, agents_path=DEPLOY / "agents.toml", agents=AGENTS,
                        workers_per_agent=1, start_nats=False)
    assert "[program:nats]" not in text and "[program:log]" in text


def test_rendered_config_escapes_percent_and_quotes(tmp_path: Path) -> None:
    odd = tmp_path / "100% data"
    programs = stack_programs(agents=["A"], agents_path=odd / "a.toml", nats_url="nats://127.0.0.1:1",
                              db_path=odd / "c.db", nats_command=None)
    (tmp_path / "logs").mkdir()
    conf = tmp_path / "s.conf"
    conf.write_text(render_config(programs, run_dir=tmp_path, log_dir=tmp_path / "logs",
                                  environment={"X": 'say "hi", 50%'}))
    opts = supervisor_options(conf)
    assert opts.configroot.supervisord.environment["X"] == 'say "hi", 50%'
    argv = shlex.split(_programs(opts)["worker-A"].command)
    assert argv[argv.index("--agents") + 1] == str(odd / "a.toml")


# `convlog up --creds FILE` hands the credentials to every program (it used them only for its own checks)
def test_up_passes_creds_to_every_program(tmp_path: Path) -> None:
    creds = tmp_path / "user.creds"
    creds.write_text("-----BEGIN NATS USER JWT-----\nx\n------END NATS USER JWT------\n")
    settings = load_settings({"creds": str(creds), "nats_url": "nats://10.1.2.3:4222",
                              "data_dir": str(tmp_path / "data")}, environ={})
    agents = tmp_path / "agents.toml"
    agents.write_text('entry = "Solo"\n[[agents]]\nname = "Solo"\ninstructions = "x"\n')
    _, text = up_config(settings, agents_path=agents, agents=["Solo"], workers_per_agent=1,
                        start_nats=False)
    assert f'CONVLOG_CREDS="{creds}"' in text or f"--creds {creds}" in text, text
