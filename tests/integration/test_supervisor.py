"""The stack under supervisord, as operators and CI run it.

* ``deploy/supervisord.conf`` (paths and port from the environment) runs the
  whole stack; a worker killed with ``kill -9`` is restarted by supervisord and
  the session carries on: the message sent after the kill is answered too.
* ``convlog up`` runs the stack in the foreground (two replicas per agent) and
  SIGTERM stops every process it started, supervisord included, each program
  with exit status 0.
* ``convlog demo`` exits 0 with the seed transcript, the escalation and both
  verdict lines, in well under a minute.

supervisord is always stopped by its PID (it stops its children); the test
then checks that every child PID it reported is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from services.cli.demo import RULES_MODEL_LABEL, consumer_name, wait_for_stack
from services.cli.keys_cmds import make_keys
from services.cli.supervise import Supervisor
from services.cli.transcript import SessionFollower, handoffs
from services.worker.scenario import (
    ESCALATION_CONVERSATION,
    SEED_CONVERSATION,
    SEED_SESSION_ID,
)
from shared.chain import verify
from shared.client import LogClient
from tests.support.deploy_config import AGENTS, DEPLOY
from tests.support.eventually import wait_until
from tests.support.natsd import free_port
from tests.support.procs import REPO_ROOT, Proc, kill_left, offline_env, pid_alive, run_cli

BIN = str(Path(sys.executable).parent)


def stack_env(**extra: str) -> dict[str, str]:
    """Our environment without CONVLOG_* or a model key (offline rules model), and this
    interpreter's scripts (``convlog``, ``nats-server``) first on PATH."""
    env = offline_env()
    env["PATH"] = BIN + os.pathsep + env.get("PATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def _assert_all_gone(pids: set[int]) -> None:
    wait_until(lambda: _no_survivors(pids), timeout=10)


def _no_survivors(pids: set[int]) -> None:
    alive = [p for p in pids if pid_alive(p)]
    assert not alive, f"still running after supervisord stopped: {alive}"


async def _one_reply_per_user_message(client: LogClient, sid: str) -> None:
    envs = await client.items(sid)
    assert verify(envs, session_id=sid) is None
    users = [e for e in envs if e.agent == "user"]
    replies = [e for e in envs if e.item_id.endswith(".reply")]
    assert len(replies) == len(users), [(e.item_order, e.agent, e.item_id) for e in envs]


def _first_line(path: Path) -> str:
    lines = path.read_text().splitlines() if path.exists() else []
    assert lines, f"nothing in {path} yet"
    return lines[0]


async def test_deploy_supervisord_restarts_a_killed_worker(short_tmp: Path) -> None:
    # Step 1: supervisord from deploy/supervisord.conf, pointed at temp dirs and a free port.
    port = free_port()
    data, logs = short_tmp / "data", short_tmp / "logs"
    data.mkdir()
    logs.mkdir()
    env = stack_env(CONVLOG_DATA_DIR=str(data), CONVLOG_LOG_DIR=str(logs),
                    CONVLOG_NATS_PORT=str(port))
    sup = Supervisor(DEPLOY / "supervisord.conf", logs / "supervisor.sock", env=env,
                     output=short_tmp / "supervisord.out")
    url = f"nats://127.0.0.1:{port}"
    children: set[int] = set()
    try:
        await asyncio.to_thread(sup.start)
        await wait_for_stack(sup, log_dir=logs, url=url, agents=AGENTS, step=print, timeout=60)
        children |= {i["pid"] for i in await asyncio.to_thread(sup.processes) if i["pid"]}
        # The health watcher's first line is the stack's verdict once it is up: its first
        # round ran ~1 s after its start, before the log service answered, and every boot
        # wrote 'UNHEALTHY: log service: no instance answers ...' to health.log.
        first = await asyncio.to_thread(wait_until, lambda: _first_line(logs / "health.log"), 30, 0.2)
        assert first.split(" ", 1)[1] == "healthy", (logs / "health.log").read_text()
        client = await LogClient.connect(url, name="t-supervisor")
        try:
            async with SessionFollower(client, SEED_SESSION_ID) as follower:
                # Step 2: the first message is routed by Triage and answered by L1Billing.
                first = await follower.turn(SEED_CONVERSATION[0], timeout=45)
                assert first.outcome == "answered", first
                assert handoffs(first) == [("Triage", "L1Billing")]
                assert first.answered_by == "L1Billing"

                # Step 3: kill -9 the worker of the session's active agent.
                before = await asyncio.to_thread(sup.process, "workers:worker-L1Billing")
                os.kill(before["pid"], signal.SIGKILL)

                # Step 4: supervisord notices and starts a new one (STARTING for its startsecs,
                # 10 s; step 5 shows it works).
                def restarted() -> dict[str, object]:
                    info = sup.process("workers:worker-L1Billing")
                    assert info["pid"] not in (0, before["pid"]), info
                    assert info["statename"] in ("STARTING", "RUNNING"), info
                    return info

                after = await asyncio.to_thread(wait_until, restarted, 60, 0.2)
                children.add(int(after["pid"]))
                log = (logs / "supervisord.log").read_text()
                assert "exited: worker-L1Billing (terminated by SIGKILL" in log, log

                # Step 5: the session continues: the next message is answered by L1Billing.
                second = await follower.turn(SEED_CONVERSATION[1], timeout=60)
                assert second.outcome == "answered", second
                assert second.answered_by == "L1Billing"
            await _one_reply_per_user_message(client, SEED_SESSION_ID)
        finally:
            await client.close()
    finally:
        rc = await asyncio.to_thread(sup.stop)
    assert rc == 0, sup._output_tail()
    _assert_all_gone(children)


async def test_convlog_up_runs_the_stack_until_sigterm(short_tmp: Path) -> None:
    # Step 1: `convlog up` with two replicas per agent; supervisord runs as its child.
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    env = stack_env(CONVLOG_DATA_DIR=str(short_tmp))
    proc = Proc([sys.executable, "-m", "services.cli.main", "up", "--nats-url", url,
                 "--workers-per-agent", "2"], log_dir=short_tmp, env=env, name="convlog-up").start()
    children: set[int] = set()
    try:
        conf = short_tmp / "supervisor" / "supervisord.conf"
        sup = Supervisor(conf, short_tmp / "supervisor" / "supervisor.sock")

        def answering() -> None:
            assert proc.running, proc.output()
            assert sup.rpc().supervisor.getState()["statename"] == "RUNNING"

        await asyncio.to_thread(wait_until, answering, 30, 0.1, retry_on=(AssertionError, OSError))
        await wait_for_stack(sup, log_dir=short_tmp / "logs", url=url, agents=AGENTS,
                             step=print, timeout=60)
        infos = await asyncio.to_thread(sup.processes)
        assert sorted(i["name"] for i in infos) == sorted(
            ["nats", "log", *(f"worker-{a}-{n}" for a in AGENTS for n in (0, 1))])
        children |= {i["pid"] for i in infos if i["pid"]}
        children.add(await asyncio.to_thread(lambda: sup.rpc().supervisor.getPID()))

        # A second `convlog up` on the same data directory says so and starts nothing.
        second = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "services.cli.main", "up", "--nats-url", url],
            env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=30, check=False)
        assert second.returncode == 1, second.stderr
        assert "another `convlog up` is running" in second.stderr, second.stderr
        assert len(await asyncio.to_thread(sup.processes)) == len(infos)

        # Step 2: two replicas per agent still give one answer per message.
        client = await LogClient.connect(url, name="t-up")
        try:
            async with SessionFollower(client, "up-session-1") as follower:
                for text in ESCALATION_CONVERSATION[:2]:
                    turn = await follower.turn(text, timeout=45)
                    assert turn.outcome == "answered", turn
                    assert turn.answered_by == "L2Support"
            await _one_reply_per_user_message(client, "up-session-1")
        finally:
            await client.close()
    finally:
        # Step 3: SIGTERM to the PID we started stops everything, supervisord too.
        rc = proc.terminate(timeout=40)
    assert rc == 0, proc.output()
    log = (short_tmp / "logs" / "supervisord.log").read_text()
    assert "supervisord started with pid" in log
    for name in ["nats", "log", *(f"worker-{a}-{n}" for a in AGENTS for n in (0, 1))]:
        assert f"stopped: {name} (exit status 0)" in log, log
    _assert_all_gone(children)


#: ``convlog ARGV`` whose ``already_running`` check is followed by 1.5 s of sleep.
SLOW_CHECK_UP = """
import asyncio, runpy, sys
import services.cli.stack_cmds as m
checked = m.already_running
async def slow(*a, **k):
    why = await checked(*a, **k)
    await asyncio.sleep(1.5)
    return why
m.already_running = slow
sys.argv = ["convlog", *sys.argv[1:]]
runpy.run_module("services.cli.main", run_name="__main__")
"""


def test_two_convlog_ups_started_at_once_on_one_data_directory(short_tmp: Path) -> None:
    # Both passed the 'another convlog up is running' check before either's supervisord
    # answered: the second's supervisord refused the socket ('Error: Another program is
    # already listening ...'), and that `convlog up`, which had said 'nats-server ...
    # (started here)', exited 2 (bad usage) without a word of its own.
    # Each `convlog up` waits 1.5 s after those checks (patched in, to widen the window).
    url = f"nats://127.0.0.1:{free_port()}"
    env = stack_env(CONVLOG_DATA_DIR=str(short_tmp))
    errs = [short_tmp / f"up-{i}.err" for i in range(2)]
    ups = [subprocess.Popen([sys.executable, "-c", SLOW_CHECK_UP, "up", "--nats-url", url],
                            env=env, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=open(err, "wb"),
                            stderr=subprocess.STDOUT) for err in errs]
    try:
        def one_exited() -> int:
            (done,) = [i for i, p in enumerate(ups) if p.poll() is not None]
            return done

        done = wait_until(one_exited, timeout=15, retry_on=(ValueError,))
        err = errs[done].read_text()
        assert ups[done].returncode == 1, err
        assert "convlog up: another `convlog up` is running" in err and "started here" not in err, err
        assert ups[1 - done].poll() is None, errs[1 - done].read_text()

        def running() -> None:  # its supervisord runs: SIGTERM stops the stack
            assert "supervisord started with pid" in errs[1 - done].read_text()

        wait_until(running, timeout=15)
    finally:
        for p in ups:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)  # our own child: it stops the stack it started
        rcs = [p.wait(40) for p in ups]
    assert rcs[1 - done] == 0, errs[1 - done].read_text()


async def test_convlog_up_programs_find_the_files_named_relative_to_where_it_ran(short_tmp: Path) -> None:
    # The programs run in the code's directory, not where `convlog up` ran: a relative
    # CONVLOG_KEYRING reached them as it was, named nothing there, and the log service
    # and every worker exited 2 until supervisord gave up on them.
    make_keys(short_tmp / "keys", ["Greeter", "Helper"])
    url = f"nats://127.0.0.1:{free_port()}"
    data = short_tmp / "data"
    env = stack_env(CONVLOG_DATA_DIR=str(data), CONVLOG_KEYRING="keys/keyring.json",
                    PYTHONPATH=str(REPO_ROOT))  # this checkout's code, from another directory
    proc = Proc([sys.executable, "-m", "services.cli.main", "up", "--nats-url", url,
                 "--agents", str(DEPLOY / "greeter.toml")],
                log_dir=short_tmp, env=env, cwd=short_tmp, name="convlog-up").start()
    try:
        sup = Supervisor(data / "supervisor" / "supervisord.conf", data / "supervisor" / "supervisor.sock")

        def answering() -> None:
            assert proc.running, proc.output()
            assert sup.rpc().supervisor.getState()["statename"] == "RUNNING"

        await asyncio.to_thread(wait_until, answering, 30, 0.1, retry_on=(AssertionError, OSError))
        await wait_for_stack(sup, log_dir=data / "logs", url=url, agents=["Greeter", "Helper"],
                             step=print, timeout=30)
        assert "keys/keyring.json" not in (data / "logs" / "log.log").read_text()
    finally:
        rc = proc.terminate(timeout=40)
    assert rc == 0, proc.output()


async def test_convlog_up_keys_logs_each_program_in_with_its_own_key(
        short_tmp: Path, nats_server_factory: Any) -> None:
    # Under the nats-users.conf of `convlog keys init` each key's seed is also its
    # program's NATS login, and each user may do only its own role's part.  `convlog up
    # --keys DIR` against such a server gave every program one login (CONVLOG_NKEY, if
    # set; else none, which the server refuses): the log service and the workers could
    # not start, supervisord gave up on them, and no message was ever answered.  And its
    # check for a log service already there asked without a login: refused, it took the
    # server for one where none answered, and started a second stack next to the first.
    from services.cli.common import packaged_agents_path
    from services.worker.spec import load_spec

    keys = short_tmp / "keys"
    make_keys(keys, list(load_spec(packaged_agents_path()).agents))
    server = nats_server_factory(config=(keys / "nats-users.conf").read_text())
    data = short_tmp / "data"
    proc = Proc([sys.executable, "-m", "services.cli.main", "up", "--nats-url", server.url,
                 "--keys", str(keys)],
                log_dir=short_tmp, env=stack_env(CONVLOG_DATA_DIR=str(data)), name="convlog-up").start()
    sup = Supervisor(data / "supervisor" / "supervisord.conf", data / "supervisor" / "supervisor.sock")
    children: set[int] = set()
    try:
        def ready() -> None:
            assert proc.running, proc.output()
            children.update(i["pid"] for i in sup.processes() if i["pid"])
            assert "log service ready" in (data / "logs" / "log.log").read_text()
            for agent in ("Triage", "L1Billing"):
                log = (data / "logs" / f"worker-{agent}.log").read_text()
                assert re.search(rf"worker {agent} ready", log), log

        await asyncio.to_thread(wait_until, ready, 60, 0.2, retry_on=(AssertionError, OSError))
        assert "nats-server" not in {i["name"] for i in await asyncio.to_thread(sup.processes)}
        # The gateway's key signs the message and is its login; Triage hands off to L1Billing.
        gateway = str(keys / "gateway.nk")
        rc, out, err = await run_cli(
            "send", "s1", "Hi, I was charged twice for my subscription this month.",
            env=stack_env(CONVLOG_NATS_URL=server.url, CONVLOG_NKEY=gateway, CONVLOG_SIGNING_KEY=gateway),
            timeout=60)
        assert rc == 0, (out, err, proc.output())
        assert "L1Billing" in out, out
        children.update(i["pid"] for i in await asyncio.to_thread(sup.processes) if i["pid"])
        assert len(children) == 1 + len(load_spec(packaged_agents_path()).agents), children
        # A second stack on that server, with another data directory, sees this one's log
        # service (asked as DIR's gateway: a login-less probe was refused, as if none answered).
        second = Proc([sys.executable, "-m", "services.cli.main", "up", "--nats-url", server.url,
                       "--keys", str(keys)], log_dir=short_tmp,
                      env=stack_env(CONVLOG_DATA_DIR=str(short_tmp / "data2")), name="convlog-up-2").start()
        try:
            rc2 = await asyncio.to_thread(second.wait, 30)
        finally:
            second.terminate(timeout=40)
        assert rc2 == 1 and "a log service already answers" in second.output(), second.output()
    finally:
        rc = proc.terminate(timeout=40)
    try:
        assert rc == 0, proc.output()
        _assert_all_gone(children)
        assert server.running  # a server it did not start, it leaves running
    finally:
        kill_left(children)  # what it left behind


def _exit_order(pids: list[int], timeout: float) -> list[int]:
    """``pids`` in the order they ended (polled every 5 ms, up to ``timeout`` s)."""
    order: list[int] = []
    deadline = time.monotonic() + timeout
    while len(order) < len(pids) and time.monotonic() < deadline:
        order += [p for p in pids if p not in order and not pid_alive(p)]
        time.sleep(0.005)
    return order


def _greeter_up(data_dir: Path, url: str) -> tuple[Proc, Supervisor]:
    """``convlog up`` of deploy/greeter.toml on ``url`` with its data in ``data_dir``, and
    a handle on the supervisord it starts (not yet answering)."""
    proc = Proc([sys.executable, "-m", "services.cli.main", "up", "--nats-url", url,
                 "--agents", str(DEPLOY / "greeter.toml")],
                log_dir=data_dir, env=stack_env(CONVLOG_DATA_DIR=str(data_dir)), name="convlog-up").start()
    return proc, Supervisor(data_dir / "supervisor" / "supervisord.conf", data_dir / "supervisor" / "supervisor.sock")


async def test_convlog_up_stops_a_program_restarted_just_before_supervisord_was_killed(
        short_tmp: Path) -> None:
    # supervisord killed (kill -9, the OOM killer) cannot stop its programs: they ran on,
    # orphaned, holding the port and the database, and convlog up exited 247 (-9 & 0xff).
    # convlog up stops them itself; it learns their PIDs once a second, and a program
    # supervisord had restarted since then was unknown to it and ran on, orphaned.
    url = f"nats://127.0.0.1:{free_port()}"
    proc, sup = _greeter_up(short_tmp, url)
    children: set[int] = set()
    try:
        def answering() -> None:
            assert proc.running, proc.output()
            assert sup.rpc().supervisor.getState()["statename"] == "RUNNING"

        await asyncio.to_thread(wait_until, answering, 30, 0.1, retry_on=(AssertionError, OSError))
        await wait_for_stack(sup, log_dir=short_tmp / "logs", url=url, agents=["Greeter", "Helper"],
                             step=print, timeout=60)
        infos = await asyncio.to_thread(sup.processes)
        children = {i["pid"] for i in infos if i["pid"]}
        assert len(children) == 4  # nats-server, the log service, two workers
        pid_of = {i["name"]: i["pid"] for i in infos}
        sup_pid = await asyncio.to_thread(lambda: sup.rpc().supervisor.getPID())
        await asyncio.sleep(1.5)  # convlog up has asked for the programs since they started
        before = await asyncio.to_thread(sup.process, "worker-Helper")
        os.kill(before["pid"], signal.SIGKILL)

        def respawned() -> int:
            info = sup.process("worker-Helper")
            assert info["pid"] not in (0, before["pid"]), info
            return int(info["pid"])

        # supervisord starts a new worker-Helper; kill supervisord at once.
        children.add(await asyncio.to_thread(wait_until, respawned, 30, 0.01))
        os.kill(sup_pid, signal.SIGKILL)
        gone = asyncio.create_task(asyncio.to_thread(_exit_order, [pid_of["log"], pid_of["nats"]], 40))
        assert await asyncio.to_thread(proc.wait, 40) == 128 + signal.SIGKILL, proc.output()
        _assert_all_gone(children)
        # Stopped tier by tier, as supervisord does: all at once, nats-server went first
        # and the log service waited out its grace for a server that was gone.
        assert await gone == [pid_of["log"], pid_of["nats"]]
    finally:
        proc.terminate(timeout=40)
        kill_left(children)  # what it left behind


async def test_convlog_up_backs_off_a_program_whose_start_fails_after_a_second(
        short_tmp: Path, nats_server_factory: Any) -> None:
    # supervisord counts a start as failed (BACKOFF: 1, 2, 3 ... s, then FATAL, which
    # convlog up reports) only when the program exits within startsecs.  At 1 s, a log
    # service or worker whose start took longer to fail (its NATS server slow to answer,
    # a loaded machine: a worker's imports alone take about a second) "entered RUNNING",
    # and each exit was restarted at once, again and again, never given up on.
    server = nats_server_factory(jetstream=False)  # every start ends in exit 2, after connecting
    proc, sup = _greeter_up(short_tmp, server.url)
    children: set[int] = set()
    try:
        # ... which takes a while: paused once convlog up has checked it is a NATS server
        # (one silent at up's start is refused as another program's port).
        await asyncio.to_thread(proc.wait_for_line, r"Ctrl-C or SIGTERM stops everything", 30)
        server.pause()
        def spawned() -> None:
            assert proc.running, proc.output()
            assert all(i["pid"] for i in sup.processes())

        await asyncio.to_thread(wait_until, spawned, 30, 0.1, retry_on=(AssertionError, OSError))
        children |= {i["pid"] for i in await asyncio.to_thread(sup.processes) if i["pid"]}
        await asyncio.sleep(2.0)
        server.resume()  # now each program learns there is no JetStream, and exits 2
        log_path = short_tmp / "logs" / "supervisord.log"

        def backed_off() -> None:
            log = log_path.read_text()
            for name in ("log", "worker-Greeter", "worker-Helper"):
                assert f"exited: {name} (exit status 2" in log, log
                assert f"success: {name} entered RUNNING" not in log, log
            states = {i["name"]: i["statename"] for i in sup.processes()}
            children.update(i["pid"] for i in sup.processes() if i["pid"])
            assert set(states.values()) <= {"BACKOFF", "STARTING"}, states

        await asyncio.to_thread(wait_until, backed_off, 15, 0.2)
    finally:
        server.resume()
        rc = proc.terminate(timeout=40)
    assert rc == 0, proc.output()
    _assert_all_gone(children)


def test_convlog_demo_runs_as_ci_runs_it(tmp_path: Path) -> None:
    # CI runs the installed console script; fall back to the module in a bare checkout.
    script = Path(BIN) / "convlog"
    cmd = [str(script), "demo"] if script.exists() else [sys.executable, "-m", "services.cli.main", "demo"]
    t0 = time.monotonic()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False,
                         cwd=tmp_path, env=stack_env())
    elapsed = time.monotonic() - t0
    print(f"convlog demo took {elapsed:.1f}s (exit {res.returncode})")
    out = res.stdout
    assert res.returncode == 0, out + res.stderr
    assert f"model: {RULES_MODEL_LABEL}" in out
    # the stack came up with progress for every process
    for part in ("nats-server", "log service", *(f"worker {a}" for a in AGENTS)):
        assert part in out
    # the seed's four messages, Triage routing to L1Billing, who answers them all
    for text in SEED_CONVERSATION:
        assert f"User: {text}" in out
    seed = out.split("=== escalation")[0]
    assert "[Triage -> L1Billing]" in seed
    assert seed.count("\nL1Billing: ") == 4
    # the escalation reaches L2Support
    escalation = out.split("=== escalation")[1].split("=== replay")[0]
    assert "[L1Billing -> L2Support]" in escalation
    assert "\nL2Support: " in escalation
    assert "issue_refund(" in escalation
    # both logs replayed and verified
    assert "verified: ticket-2026-0314-001: 10 items" in out
    assert "verified: ticket-2026-0314-002: " in out
    assert "convlog demo passed" in out
    assert elapsed < 60, f"convlog demo took {elapsed:.1f}s"


def test_demo_takes_an_agents_file_relative_to_the_current_directory(tmp_path: Path) -> None:
    # The demo wrote the --agents path as given into the supervisord config, whose programs
    # run in the code's directory: every worker exited 'cannot read spec file' until
    # supervisord gave up, and the demo failed after 30 s ("worker Greeter not ready").
    shutil.copy(DEPLOY / "greeter.toml", tmp_path / "greeter.toml")
    env = stack_env(PYTHONPATH=str(REPO_ROOT))  # this checkout, from another directory
    res = subprocess.run([sys.executable, "-m", "services.cli.main", "demo", "--agents", "greeter.toml"],
                         capture_output=True, text=True, timeout=180, check=False, cwd=tmp_path, env=env)
    out = res.stdout
    assert res.returncode == 0, out + res.stderr
    assert "[Greeter -> Helper]" in out and "\nHelper: " in out
    assert "convlog demo passed" in out


def test_demo_constants_match_the_worker() -> None:
    from services.worker.intake import consumer_name as worker_consumer_name
    from services.worker.rules_model import RULES_MODEL_NAME

    assert RULES_MODEL_LABEL == RULES_MODEL_NAME
    assert all(consumer_name(a) == worker_consumer_name(a) for a in AGENTS)


@contextlib.contextmanager
def _demo(tmp_path: Path, *args: str, name: str) -> Iterator[tuple[Proc, int, Path]]:
    """``convlog demo ARGS``, its supervisord's PID and its directory, once it runs; in
    teardown the demo is stopped, and the stack it left stopped by that PID and its
    directory removed."""
    proc = Proc([sys.executable, "-m", "services.cli.main", "demo", *args],
                log_dir=tmp_path, env=stack_env(), name=name).start()
    sup_pid = None
    workdir = None
    try:
        m = proc.wait_for_line(r"under supervisord \(pid (\d+)\) in (\S+)", timeout=60)
        sup_pid, workdir = int(m.group(1)), m.group(2)
        yield proc, sup_pid, Path(workdir)
    finally:
        proc.terminate()
        if sup_pid is not None and pid_alive(sup_pid):  # the stack the demo left: stop it by its PID
            with contextlib.suppress(ProcessLookupError):
                os.kill(sup_pid, signal.SIGTERM)
            deadline = time.monotonic() + 40
            while pid_alive(sup_pid) and time.monotonic() < deadline:
                time.sleep(0.2)
        if workdir and re.search(r"convlog-demo-", workdir):
            shutil.rmtree(workdir, ignore_errors=True)


# SIGTERM to `convlog demo` stops the stack it started (supervisord and the stack outlived
# it), and its files go with it (they were left in the temporary directory, unsaid)
def test_sigterm_to_convlog_demo_stops_its_stack(tmp_path: Path) -> None:
    with _demo(tmp_path, "--offline", name="demo") as (proc, sup_pid, workdir):
        proc.wait_for_line(r"stack ready", timeout=60)
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(30) == 128 + signal.SIGTERM, proc.output()
        deadline = time.monotonic() + 30
        while pid_alive(sup_pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not pid_alive(sup_pid), f"supervisord {sup_pid} outlived convlog demo:\n{proc.output()}"
        assert not workdir.exists(), proc.output()


# A second SIGTERM while `convlog demo` stops its stack after the first (an impatient `kill`,
# a process manager's second try) cancelled the demo's `finally` in the middle: "stack
# stopped" was never said and the temporary directory was left behind.
def test_a_second_sigterm_while_demo_stops_its_stack_lets_the_stop_finish(tmp_path: Path) -> None:
    with _demo(tmp_path, "--offline", name="demo-twice") as (proc, sup_pid, workdir):
        proc.wait_for_line(r"stack ready", timeout=60)
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait_for_line(r"stopping the stack", timeout=30)
        os.kill(proc.pid, signal.SIGTERM)  # again, while the stack stops
        assert proc.wait(60) == 128 + signal.SIGTERM, proc.output()
        assert "stack stopped" in proc.output(), proc.output()
        assert not pid_alive(sup_pid), f"supervisord {sup_pid} outlived convlog demo:\n{proc.output()}"
        assert not workdir.exists(), proc.output()


# `convlog demo --web` stopped by SIGTERM: the console stops and the stack is stopped. The
# console's signal handlers were removed as it stopped, so a second SIGTERM while the stack
# stopped (an impatient `kill`, a process manager's second try) ended the demo at once and
# left supervisord, nats-server and the log service running, orphaned.
def test_a_second_sigterm_while_demo_web_stops_its_stack_leaves_nothing_running(tmp_path: Path) -> None:
    with _demo(tmp_path, "--offline", "--web", "--web-port", "0", name="demo-web") as (proc, sup_pid, _):
        proc.wait_for_line(r"web console: http", timeout=90)
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait_for_line(r"stopping the stack", timeout=30)
        os.kill(proc.pid, signal.SIGTERM)  # again, while the stack stops
        code = proc.wait(60)
        assert "stack stopped" in proc.output(), proc.output()
        assert code == 0, proc.output()
        assert not pid_alive(sup_pid), f"supervisord {sup_pid} outlived convlog demo --web:\n{proc.output()}"
