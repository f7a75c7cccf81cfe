"""``deploy/systemd`` and ``deploy/Procfile`` are tests too: every unit starts a
command that exists with flags convlog's own parser accepts (``systemd-analyze
verify`` where it is installed), the health check runs on a timer, and the
Procfile runs the same processes as supervisord."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shared.config import load_settings
from tests.support.deploy_config import (
    AGENTS,
    DEPLOY,
    nats_flags_are_valid,
    parse_convlog,
    systemd_verify,
)
from tests.support.natsd import NatsServer, free_port, nats_server_binary
from tests.support.procs import REPO_ROOT, python_module, service_env
from tests.support.systemd_unit import read_unit

# -- systemd -------------------------------------------------------------------


UNITS = sorted((DEPLOY / "systemd").glob("*.service"))
TIMERS = sorted((DEPLOY / "systemd").glob("*.timer"))


def test_systemd_units_are_the_expected_ones() -> None:
    assert [u.name for u in UNITS] == ["convlog-health.service", "convlog-log.service",
                                       "convlog-log@.service", "convlog-nats.service",
                                       "convlog-nats@.service", "convlog-worker@.service"]
    assert [t.name for t in TIMERS] == ["convlog-health.timer"]


def test_systemd_health_check_runs_convlog_health_on_a_timer() -> None:
    u = read_unit(DEPLOY / "systemd" / "convlog-health.service")
    assert set(u) == {"Unit", "Service"}  # started by its timer only
    assert u["Service"]["Type"] == ["oneshot"]
    (exec_start,) = u["Service"]["ExecStart"]
    argv = shlex.split(exec_start)
    assert Path(argv[0]).name == "convlog"
    args = parse_convlog(argv[1:])
    assert args.command == "health" and args.every is None  # one check, exit 0 or 1
    assert Path(args.agents).name == "agents.toml"
    t = read_unit(DEPLOY / "systemd" / "convlog-health.timer")
    assert t["Install"]["WantedBy"] == ["timers.target"]
    assert t["Timer"]["OnUnitActiveSec"] == ["1min"]


@pytest.mark.parametrize("unit", [u for u in UNITS if u.name != "convlog-health.service"],
                         ids=lambda p: p.name)
def test_systemd_unit_starts_a_command_that_exists(unit: Path, tmp_path: Path) -> None:
    u = read_unit(unit)
    assert set(u) == {"Unit", "Service", "Install"}
    service = u["Service"]
    assert service["Restart"][0] in ("always", "on-failure")
    assert service["KillSignal"] == ["SIGTERM"]
    assert u["Install"]["WantedBy"] == ["multi-user.target"]
    (exec_start,) = service["ExecStart"]
    argv = shlex.split(exec_start)
    binary = Path(argv[0]).name
    if binary == "nats-server":
        conf = Path(argv[argv.index("-c") + 1])
        assert conf.parent == Path("/etc/convlog/nats")
        # a template's instance is the cluster node: cluster-%i.conf -> cluster-1.conf ...
        names = [conf.name.replace("%i", n) for n in "123"] if "%i" in conf.name else [conf.name]
        for name in names:
            res = subprocess.run([nats_server_binary(), "-t", "-c", str(DEPLOY / "nats" / name),
                                  *argv[argv.index("-c") + 2:]],
                                 capture_output=True, text=True, timeout=30, check=False)
            assert res.returncode == 0, res.stdout + res.stderr
        return
    assert binary == "convlog", exec_start
    instances = AGENTS if "%i" in exec_start else [None]
    for agent in instances:
        args = parse_convlog([a.replace("%i", agent) if agent else a for a in argv[1:]])
        if args.command == "worker":
            assert args.agent == agent
            assert Path(args.agents).name == "agents.toml"
        else:
            assert args.command == "log"
    if "%i" in exec_start:
        assert unit.name == "convlog-worker@.service"
        assert "%i" in u["Unit"]["Description"][0]


def _unit_environment(unit: dict[str, dict[str, list[str]]], files: dict[str, Path]) -> dict[str, str]:
    """The environment systemd gives a unit's command: its ``Environment=`` lines, then
    its ``EnvironmentFile=`` files (``files`` maps each path to a local one; a ``-``
    path that is not there is skipped, as systemd does)."""
    env = dict(line.split("=", 1) for line in unit["Service"].get("Environment", []))
    for name in unit["Service"].get("EnvironmentFile", []):
        local = files.get(name.removeprefix("-"))
        if local is None or not local.exists():
            assert name.startswith("-"), name
            continue
        for line in local.read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                key, _, value = line.partition("=")
                env[key.strip()] = value.strip()
    return env


def test_systemd_nats_unit_can_run_auth_conf_without_giving_its_passwords_to_convlog(tmp_path: Path) -> None:
    # convlog-nats.service says to run deploy/nats/auth.conf instead of single.conf for the
    # per-role users, and auth.conf reads the users' passwords from the environment; the
    # unit had no Environment(File)= at all, so nats-server refused to start (and the
    # passwords could only go into convlog.env, which every worker reads).
    from tests.docs.test_deploy import PASSWORDS

    unit = read_unit(DEPLOY / "systemd" / "convlog-nats.service")
    read_by_convlog = {name.removeprefix("-") for u in UNITS if u.name.startswith(("convlog-log", "convlog-worker",
                                                                                   "convlog-health"))
                       for name in read_unit(u)["Service"].get("EnvironmentFile", [])}
    own = [name.removeprefix("-") for name in unit["Service"].get("EnvironmentFile", [])
           if name.removeprefix("-") not in read_by_convlog]
    assert len(own) == 1, f"convlog-nats.service reads no file of its own for auth.conf's passwords: {own}"
    (own_file,) = own
    assert own_file in (DEPLOY / "systemd" / "convlog-nats.service").read_text().split("\n[Unit]")[0], \
        "the unit's header does not say where the passwords go"
    local = tmp_path / "nats.env"
    local.write_text("".join(f"{k}={v}\n" for k, v in PASSWORDS.items()))
    env = {"PATH": "/usr/bin:/bin", **_unit_environment(unit, {own_file: local})}
    (exec_start,) = unit["Service"]["ExecStart"]
    argv = shlex.split(exec_start)
    assert argv[argv.index("-c") + 1] == "/etc/convlog/nats/single.conf"
    res = subprocess.run([nats_server_binary(), "-t", "-c", str(DEPLOY / "nats" / "auth.conf")],
                         env=env, capture_output=True, text=True, timeout=30, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def test_systemd_log_service_and_workers_log_in_as_their_own_nats_users(tmp_path: Path) -> None:
    # With auth.conf (or nats-users.conf) the log service logs in as `log` and each worker
    # as `worker` (or its agent's key).  Every convlog unit read the one convlog.env, whose
    # settings win over a unit's Environment= lines (a `systemctl edit` included): the
    # CONVLOG_USER=log that convlog-log.service says to put there made every worker the
    # `log` user too, which may not append (each turn failed), and gave it the log's password.
    units = {u.name: read_unit(u) for u in UNITS if u.name.startswith(("convlog-log", "convlog-worker",
                                                                         "convlog-health"))}
    reads = {name: [f.removeprefix("-") for f in u["Service"].get("EnvironmentFile", [])] for name, u in units.items()}
    shared = "/etc/convlog/convlog.env"
    assert all(files[0] == shared for files in reads.values()), reads
    log_files = {f for name, files in reads.items() if not name.startswith("convlog-worker") for f in files[1:]}
    worker_files = set(reads["convlog-worker@.service"][1:])
    assert log_files and worker_files and not log_files & worker_files, reads
    for name in units:  # each unit's header says where its own credentials go
        header = (DEPLOY / "systemd" / name).read_text().split("\n[Unit]")[0]
        assert any(f in header for f in reads[name][1:]), name
    files = {shared: tmp_path / "convlog.env"}
    files[shared].write_text("CONVLOG_NATS_URL=nats://127.0.0.1:4222\n")
    for i, f in enumerate(sorted(log_files | worker_files)):
        files[f] = tmp_path / f"own-{i}.env"
        user = "log" if f in log_files else "worker"
        files[f].write_text(f"CONVLOG_USER={user}\nCONVLOG_PASSWORD={user}-secret\n")
    for name, unit in units.items():
        env = _unit_environment(unit, files)
        user = "worker" if name.startswith("convlog-worker") else "log"
        assert (env["CONVLOG_USER"], env["CONVLOG_PASSWORD"]) == (user, f"{user}-secret"), name
        assert env["CONVLOG_NATS_URL"] == "nats://127.0.0.1:4222", name
        settings = load_settings({}, env, check_paths=False)
        assert settings.user == user, name


def test_systemd_install_steps_copy_every_unit_and_timer() -> None:
    # The install steps copied deploy/systemd/*.service only: convlog-health.timer, which
    # convlog-health.service says to enable, was not there ("Unit ... not found").
    header = (DEPLOY / "systemd" / "convlog-nats.service").read_text().split("\n[Unit]")[0]
    copied = {p.name for sources in re.findall(r"\bcp((?: deploy/systemd/\S+)+) /etc/systemd/system/?(?:\s|$)",
                                               header)
              for s in sources.split() for p in REPO_ROOT.glob(s)}
    assert copied == {u.name for u in [*UNITS, *TIMERS]}, copied
    assert "convlog-health.timer" in header.split("systemctl enable", 1)[1]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verifies_the_units(tmp_path: Path) -> None:
    # The units name /opt/convlog/venv/bin/...; point them at this interpreter's scripts.
    bindir = str(Path(sys.executable).parent)
    units = []
    for unit in [*UNITS, *TIMERS]:
        text = unit.read_text().replace("/opt/convlog/venv/bin", bindir)
        name = unit.name.replace("@.service", "@Triage.service")  # an instance of the template
        (tmp_path / name).write_text(text)
        units.append(str(tmp_path / name))
    systemd_verify(units)


# -- Procfile ----------------------------------------------------------------------


def _procfile(environ: dict[str, str] | None = None) -> dict[str, list[str]]:
    """name -> argv, each command expanded by /bin/sh as Procfile runners do (with
    ``environ`` added to a bare PATH)."""
    out = {}
    for line in (DEPLOY / "Procfile").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_-]+):\s*(.+)$", line)
        if not m:
            assert not line.strip() or line.startswith("#"), line
            continue
        res = subprocess.run(["sh", "-c", f'for a in {m.group(2)}; do printf "%s\\0" "$a"; done'],
                             capture_output=True, text=True, check=True,
                             env={"PATH": "/usr/bin:/bin", **(environ or {})})
        out[m.group(1)] = res.stdout.rstrip("\0").split("\0")
    return out


def test_procfile_runs_the_same_processes_as_supervisord(tmp_path: Path) -> None:
    procs = _procfile()
    assert len(procs) == 2 + len(AGENTS)
    workers = []
    for name, argv in procs.items():
        if argv[0] == "nats-server":
            nats_flags_are_valid(argv[1:], tmp_path)
            assert "-js" in argv
            continue
        assert argv[0] == "convlog", name
        args = parse_convlog(argv[1:])
        if args.command == "worker":
            assert (REPO_ROOT / args.agents).exists()
            workers.append(args.agent)
        else:
            assert args.command == "log"
    assert sorted(workers) == sorted(AGENTS)


def test_procfile_log_and_workers_started_before_nats_server_wait_for_it(tmp_path: Path) -> None:
    # A Procfile runner starts every line at once, and stops them all when one exits: the
    # log service, with --no-embedded, exited 3 at once when nats-server was not listening
    # yet ("no NATS server answers"), where the workers wait for it (--start-wait).
    # On a fresh checkout the data directory does not exist until nats-server makes its
    # store there: the log line's `--db DATA_DIR/convlog.db` exited 2 at once ("the
    # directory .convlog does not exist"), and the runner stopped the stack.  The lines
    # run as written, with the data directory (as .convlog in a fresh clone) not there yet.
    data = tmp_path / "data"
    procs = _procfile({"CONVLOG_DATA_DIR": str(data)})
    port = free_port()  # not the Procfile's 4222: CONVLOG_NATS_URL moves every process
    env = {**service_env(data), "CONVLOG_NATS_URL": f"nats://127.0.0.1:{port}"}
    env.pop("OPENAI_API_KEY", None)
    assert not data.exists()
    started = [python_module("services.cli.main", *procs["log"][1:], log_dir=tmp_path, env=env, name="log"),
               python_module("services.cli.main", *procs["triage"][1:], log_dir=tmp_path, env=env,
                             name="triage")]
    server = NatsServer(tmp_path / "nats", port=port)
    try:
        for proc in started:
            proc.start()
        for proc in started:
            proc.wait_for_line("waiting for NATS JetStream at", timeout=30)
        time.sleep(1)
        assert all(proc.running for proc in started), [proc.output() for proc in started]
        server.start()  # the `nats` line, later
        started[0].wait_for_line("log service ready", timeout=60)
        started[1].wait_for_line(r"worker \S+ ready", timeout=60)
    finally:
        for proc in started:
            proc.terminate()
        server.stop()
    assert "log service: NATS JetStream answers at" in started[0].output()
    assert (data / "convlog.db").is_file()  # the log where the Procfile says it goes


def test_systemd_log_unit_keeps_its_database_in_its_state_directory_unless_the_env_file_says() -> None:
    # A --db on the command line beats CONVLOG_DB, so /etc/convlog/convlog.env could not move
    # the database although the unit says its settings come from there.
    u = read_unit(DEPLOY / "systemd" / "convlog-log.service")
    (exec_start,) = u["Service"]["ExecStart"]
    args = parse_convlog(shlex.split(exec_start)[1:])
    assert args.command == "log" and args.db is None
    env = dict(line.split("=", 1) for line in u["Service"]["Environment"])
    assert load_settings({}, env, check_paths=False).db_path == Path("/var/lib/convlog/convlog.db")
    moved = load_settings({}, {**env, "CONVLOG_DB": "/srv/convlog/log.db"}, check_paths=False)
    assert moved.db_path == Path("/srv/convlog/log.db")


# A log service that dies at its first append while the disk is still full restarts every
# second: systemd's default start limit (5 in 10 s) then left it failed for good, and it
# did not come back once space was freed.
@pytest.mark.parametrize("unit", [u for u in UNITS if u.name != "convlog-health.service"],
                         ids=lambda p: p.name)
def test_systemd_restarting_units_never_give_up_restarting(unit: Path) -> None:
    u = read_unit(unit)
    assert u["Service"]["Restart"] in (["always"], ["on-failure"])
    assert u["Unit"].get("StartLimitIntervalSec") == ["0"], unit.name
