"""``convlog up`` and ``convlog demo``: the whole stack under supervisord.

``convlog up`` writes a supervisord config generated from the current
settings into ``DATA_DIR/supervisor/`` (nats-server when none answers at a
loopback URL, the log service, ``--workers-per-agent`` workers per agent) and
runs ``supervisord -n -c FILE`` as its child: the stack runs in the
foreground, a program that dies is restarted, and SIGTERM or Ctrl-C stops all
of it, each priority tier at once (all workers, then the log service, then
nats-server: :meth:`~services.cli.supervise.Supervisor.stop`; supervisord
alone stops one program a second).  It exits with supervisord's status.
Its nats-server keeps JetStream in ``DATA_DIR/jetstream``, as
``convlog log``'s embedded one does.  Next to a running ``convlog log`` or
``convlog up`` (the database's lock is held, a log service answers, or the
supervisord socket answers) it says so and exits instead of starting
programs that would crash-loop.  ``convlog demo`` is described in
:mod:`services.cli.demo`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import fcntl
import os
import signal
import xmlrpc.client
from pathlib import Path
from typing import Any

from shared.config import ConfigError, Settings, nats_servers
from shared.errors import BadRequestError, UnavailableError

from .common import (
    EXIT_FAIL,
    cancelled_by_signals,
    is_loopback,
    packaged_agents_path,
    port_number,
    positive_float,
    positive_int,
    setting_source,
)
from .common import stderr as _stderr
from .log_cmd import db_source
from .stack import nats_answers, nats_greets, nats_server_binary
from .storage import check_data_dir, check_service_db, db_in_use
from .supervise import (
    Supervisor,
    SupervisorError,
    code_root,
    render_config,
    socket_path_for,
    stack_programs,
    with_keys,
)
from .worker_cmds import check_worker_settings

__all__ = ["cmd_demo", "cmd_up", "demo_arguments", "up_arguments", "up_config"]


def up_config(settings: Settings, *, agents_path: Path, agents: list[str],
              workers_per_agent: int, start_nats: bool, keys: Path | None = None) -> tuple[Path, str]:
    """The supervisord config ``convlog up`` runs: (path to write, text); ``keys``: a
    ``convlog keys init --out`` directory, each program signing with its own key of it,
    and logging in with it (``CONVLOG_NKEY``) to a NATS server it does not start (one
    that enforces the directory's ``nats-users.conf``; its own has no users)."""
    data_dir = settings.data_dir.resolve()
    run_dir = data_dir / "supervisor"
    log_dir = data_dir / "logs"
    nats_command = None
    if start_nats:
        if not (settings.embedded and is_loopback(settings.nats_url)):
            raise UnavailableError(
                f"no NATS server answers at {settings.nats_url} and convlog up starts one only "
                "for a loopback URL with CONVLOG_EMBEDDED not false"
            )
        host, port = nats_servers(settings.nats_url)[0]
        nats_command = [nats_server_binary(), "-a", host, "-p", str(port), "-js",
                        "-sd", str(data_dir / "jetstream")]
    if settings.metrics_port and settings.metrics_port + len(agents) > 65535:
        raise BadRequestError(f"CONVLOG_METRICS_PORT {settings.metrics_port}: convlog up gives the log "
                              f"service that port and its {len(agents)} agents' workers the ports after it, "
                              "past 65535: choose a lower one")
    programs = stack_programs(
        agents=agents, agents_path=agents_path.resolve(), nats_url=settings.nats_url,
        db_path=settings.db_path.resolve(), nats_command=nats_command,
        workers_per_agent=workers_per_agent, grace=settings.grace, metrics_port=settings.metrics_port,
    )
    if keys is not None:
        programs = [with_keys(p, keys, login=not start_nats) for p in programs]
    environment = {
        "CONVLOG_METRICS_PORT": "",  # each program's own port is a flag (stack_programs)
        "CONVLOG_NATS_URL": settings.nats_url,
        "CONVLOG_PREFIX": settings.prefix,
        "CONVLOG_DATA_DIR": str(data_dir),
        "CONVLOG_LOG_LEVEL": settings.log_level,
        "CONVLOG_EMBEDDED": "false",
        "PYTHONUNBUFFERED": "1",
    }
    # Every file a setting names, absolute: the programs run in code_root(), where a
    # relative CONVLOG_KEYRING (or TLS file, ...) from supervisord's environment named
    # nothing, and each program exited 2 until supervisord gave up.  (A flag, --creds,
    # reaches the programs this way too.)
    for name in ("creds", "nkey", "tls_ca", "tls_cert", "tls_key", *(() if keys else ("keyring",))):
        if (value := getattr(settings, name)) is not None:
            environment[f"CONVLOG_{name.upper()}"] = str(Path(value).resolve())
    text = render_config(programs, run_dir=run_dir, log_dir=log_dir, environment=environment,
                         directory=code_root())
    return run_dir / "supervisord.conf", text


def _supervisord_answers(sock: Path) -> bool:
    """True when a supervisord serves the control socket of this data directory."""
    import socket

    if not sock.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(str(sock))
        except OSError:
            return False
    return True


async def _log_service_answers(settings: Settings) -> bool:
    """True when something serves this prefix's log subjects on the NATS server."""
    import nats
    import nats.errors

    from shared.client import connect_options
    from shared.nats_connect import open_client

    options = {**connect_options(settings, name="convlog-up"), "allow_reconnect": False}
    try:
        nc = await open_client(**options)
    except (OSError, nats.errors.Error):
        return False
    try:
        await nc.request(settings.subjects.sessions, b'{"limit":1}', timeout=2)
        return True
    except nats.errors.NoRespondersError:
        return False
    except nats.errors.TimeoutError:
        return True  # something holds the subject, busy
    finally:
        await nc.close()


async def already_running(settings: Settings, run_dir: Path) -> str | None:
    """Why ``convlog up`` must not start here, or ``None``."""
    if _supervisord_answers(socket_path_for(run_dir)):
        return (f"another `convlog up` is running for {settings.data_dir.resolve()} "
                f"(supervisorctl -s unix://{socket_path_for(run_dir)} status)")
    if db_in_use(settings.db_path):
        return (f"a log service (`convlog log` or another `convlog up`) holds {settings.db_path}; "
                "stop it first, or give this stack another --data-dir")
    if nats_answers(settings.nats_url) and await _log_service_answers(settings):
        return (f"a log service already answers on {settings.subjects.sessions} at "
                f"{settings.nats_url} (`convlog log` or another `convlog up`); stop it first, "
                "or use another --prefix or NATS server")
    return None


async def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    from services.worker.spec import SpecError, load_spec

    agents_path = settings.agents or packaged_agents_path()
    try:
        spec = load_spec(agents_path)
    except SpecError as e:
        raise BadRequestError(f"bad agent spec: {e}") from e
    # What its programs would refuse (signatures required without a keyring, a bad model
    # URL), each exiting 2 at every start until supervisord gave up on it while the stack
    # ran on without them: said once, before anything starts.
    keys = _keys_dir(args, settings, list(spec.agents))
    if keys is None:
        check_worker_settings(settings)
    for name, named in ((setting_source(args, "data_dir"), settings.data_dir.resolve()),
                        (setting_source(args, "agents"), Path(agents_path)), ("--keys", keys),
                        (db_source(args, settings) or "CONVLOG_DATA_DIR", settings.db_path)):
        _config_can_name(name, named)
    check_data_dir(settings.data_dir.resolve(), name=setting_source(args, "data_dir"))
    check_service_db(settings.db_path, name=db_source(args, settings),
                     data_dir_name=setting_source(args, "data_dir"))
    start_nats = not nats_answers(settings.nats_url)
    if not start_nats and not nats_greets(settings.nats_url):
        # Taken for a NATS server that runs: the log service and workers waited 60 s for
        # JetStream there, exited and were restarted, forever, under 'NATS: ... (already running)'.
        raise UnavailableError(
            f"something at {settings.nats_url} takes connections but is not a NATS server (it sent "
            "no NATS INFO line): stop it, or give convlog up another port (--nats-url)"
        )
    path, text = up_config(settings, agents_path=Path(agents_path), agents=list(spec.agents),
                           workers_per_agent=args.workers_per_agent, start_nats=start_nats, keys=keys)
    if args.print_config:
        return _write_config(path, text, settings, print_it=True)
    # Held from the checks below until this `convlog up` ends: two started at once both
    # passed them before either's supervisord answered, and the second's supervisord
    # refused the control socket (exit 2, nothing said by convlog up).
    lock = _hold_up_lock(path.parent)
    if lock is None:
        _stderr(f"convlog up: another `convlog up` is running for {settings.data_dir.resolve()} "
                f"(supervisorctl -s unix://{socket_path_for(path.parent)} status)")
        return EXIT_FAIL
    try:
        return await _checked_up(args, settings, keys, start_nats, path, text, list(spec.agents))
    finally:
        os.close(lock)


def _write_config(path: Path, text: str, settings: Settings, *, print_it: bool) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    (settings.data_dir.resolve() / "logs").mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    if print_it:
        print(text, end="")
    return 0


def _hold_up_lock(run_dir: Path) -> int | None:
    """An exclusive ``flock`` on ``run_dir/up.lock``, held by the returned descriptor (not
    inherited: Python's are close-on-exec), or ``None`` when another `convlog up` holds
    it.  A filesystem that refuses locks (ENOLCK) leaves only the checks of
    :func:`already_running`, as before."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / "up.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError:
        pass
    return fd


async def _checked_up(args: argparse.Namespace, settings: Settings, keys: Path | None, start_nats: bool,
                      path: Path, text: str, agents: list[str]) -> int:
    """Run the stack of ``path`` (``text``) unless :func:`already_running` says not to."""
    probe = settings
    if keys is not None and not start_nats:
        from shared.signing import KeyringError, Signer

        # A server that enforces DIR's nats-users.conf refuses a login-less probe (as if no
        # log service answered): ask as its gateway user, who may list sessions.
        with contextlib.suppress(KeyringError):  # no gateway.nk in DIR: as before
            Signer.load(keys / "gateway.nk")
            probe = dataclasses.replace(settings, nkey=str(keys / "gateway.nk"))
    busy = await already_running(probe, path.parent)
    if busy is not None:
        _stderr(f"convlog up: {busy}")
        return EXIT_FAIL
    _write_config(path, text, settings, print_it=False)
    sock = socket_path_for(path.parent)
    _stderr(
        f"convlog up: {'nats-server, ' if start_nats else ''}log service and "
        f"{args.workers_per_agent} worker(s) for each of {', '.join(agents)}\n"
        f"  NATS: {settings.nats_url}{' (started here)' if start_nats else ' (already running)'}\n"
        f"  config: {path}\n  logs: {settings.data_dir.resolve() / 'logs'}\n"
        f"  status: supervisorctl -s unix://{sock} status\n"
        "  Ctrl-C or SIGTERM stops everything"
    )
    return await _supervise(Supervisor(path, sock, console=True))


def _config_can_name(name: str, path: Path | None) -> None:
    """Refuse a path supervisord's configuration (UTF-8 text) cannot hold.

    Raises:
        ConfigError: naming the setting, when the path's name is not UTF-8.
    """
    if path is None:
        return
    try:
        str(path).encode()
    except UnicodeEncodeError:
        raise ConfigError(f"{name}: {os.fsencode(path)!r} is not UTF-8, and supervisord's configuration "
                          "(UTF-8 text) cannot name it: use a path whose name is UTF-8") from None


def _keys_dir(args: argparse.Namespace, settings: Settings, agents: list[str]) -> Path | None:
    """``--keys DIR``, checked: every file its programs need is there and holds a key.

    Raises:
        ConfigError: CONVLOG_SIGNING_KEY is set (one key for the log service and every
            worker, which the log refuses), CONVLOG_NKEY is set with ``--keys`` (one NATS
            login for all of them, where each logs in with its own key), or a file of DIR
            is missing or unreadable.
    """
    if settings.signing_key is not None:
        raise ConfigError(
            f"{setting_source(args, 'signing_key')}: convlog up would give that one key to the log "
            "service and to every worker, and the log refuses a worker signing with another's key: "
            "give each program its own with --keys DIR (from `convlog keys init --out DIR`)"
        )
    if args.keys is None:
        return None
    # Under the nats-users.conf of DIR each user may do only its own role's part: one login
    # for all (a creds file wins over the key in nats-py) would bring that back.
    for name in ("nkey", "creds", "user", "token"):
        if getattr(settings, name) is not None:
            raise ConfigError(
                f"{setting_source(args, name)}: with --keys each program logs in to NATS with its own "
                "key of DIR (a user of its nats-users.conf), not with one login for all: unset it"
            )
    keys = Path(args.keys).resolve()
    from shared.signing import Keyring, KeyringError, Signer

    try:
        ring = Keyring.load(keys / "keyring.json")
        for name in ["log", *agents]:
            key_id = Signer.load(keys / f"{name}.nk").key_id
            # A key the keyring does not give this program (a keyring of another keys init):
            # the log service refused its own at each start, the log every worker's appends.
            why = (ring.log_key_refusal(key_id) if name == "log"
                   else ring.refusal(key_id, name, via_inbound=False))
            if why is not None:
                raise KeyringError(f"{keys / f'{name}.nk'}: {why}")
    except KeyringError as e:
        raise ConfigError(f"--keys {args.keys}: {e} (`convlog keys init --agents SPEC --out DIR` "
                          "writes one key per agent of the spec)") from None
    check_worker_settings(dataclasses.replace(settings, keyring=keys / "keyring.json", require_signatures=True))
    return keys


def gave_up(infos: list[dict[str, Any]], said: set[str], socket: Path | str) -> list[str]:
    """One line for each program supervisord has newly given up on (``FATAL``: too many
    failed starts), which it will not start again by itself: ``convlog up`` runs on, so it
    says so, naming the program's log and how to start it again (``said``: the programs
    named already; one that runs again may be named again later)."""
    lines = []
    for info in infos:
        name = f"{info['group']}:{info['name']}" if info.get("group") not in (None, info["name"]) else info["name"]
        if info["statename"] != "FATAL":
            said.discard(name)
            continue
        if name in said:
            continue
        said.add(name)
        why = info.get("spawnerr") or info.get("description") or "too many failed starts"
        log = info.get("stdout_logfile") or "its log"
        lines.append(f"convlog up: supervisord gave up on {name} ({why}); see {log}, then "
                     f"`supervisorctl -s unix://{socket} start {name}`")
    return lines


async def _supervise(sup: Supervisor) -> int:
    """Run ``sup`` until SIGTERM, SIGINT or SIGHUP (then stop it, tier by tier) or
    until supervisord exits by itself; its exit status."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        try:
            await asyncio.to_thread(sup.start)
        except SupervisorError as e:
            _stderr(f"convlog up: {e}")
            return EXIT_FAIL
        assert sup.proc is not None
        exited = asyncio.ensure_future(asyncio.to_thread(sup.proc.wait))
        asked = asyncio.ensure_future(stop.wait())
        given_up: set[str] = set()
        while not (exited.done() or asked.done()):
            # Know the programs' PIDs: should supervisord be killed, sup.stop stops them.
            with contextlib.suppress(OSError, xmlrpc.client.Error):
                for line in gave_up(await asyncio.to_thread(sup.processes), given_up, sup.socket):
                    _stderr(line)
            await asyncio.wait([exited, asked], timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
        asked.cancel()
        rc = await asyncio.to_thread(sup.stop)
        await exited
        if rc is None:
            return EXIT_FAIL
        return 128 - rc if rc < 0 else rc  # killed by signal N: 128+N, as a shell says
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        await asyncio.to_thread(sup.stop)  # idempotent; a failed start leaves nothing behind


async def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from .demo import run_demo

    # SIGTERM/SIGHUP: the demo's `finally` stops the stack it started.
    return await cancelled_by_signals(run_demo(
        agents_path=Path(args.agents) if args.agents else None,
        offline=args.offline, keep=args.keep, turn_timeout=args.turn_timeout,
        web_port=args.web_port if args.web else None, signed=args.signed,
    ))


def up_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--agents", help="agents TOML [CONVLOG_AGENTS, default: the packaged "
                   "reference scenario]")
    p.add_argument("--db", metavar="PATH",
                   help="SQLite file [CONVLOG_DB, default DATA_DIR/convlog.db]")
    p.add_argument("--workers-per-agent", type=positive_int, default=1, metavar="N",
                   help="replicas per agent; they share its durable consumer (default 1)")
    p.add_argument("--print-config", action="store_true",
                   help="write the supervisord config, print it and exit")
    p.add_argument("--keys", metavar="DIR",
                   help="sign everything: each program with its own key of DIR (from `convlog keys "
                        "init --out DIR`: log.nk, <Agent>.nk, keyring.json); signatures required")


def demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--agents", help="agents TOML (default: the packaged reference scenario)")
    p.add_argument("--offline", action="store_true",
                   help="use the offline rules model even if OPENAI_API_KEY is set")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory and logs")
    p.add_argument("--turn-timeout", type=positive_float, default=20.0, metavar="S",
                   help="seconds to wait for each turn's answer (default 20)")
    p.add_argument("--log-level", help="log level of the demo itself [CONVLOG_LOG_LEVEL]")
    p.add_argument("--web", action="store_true",
                   help="then keep the stack up and serve the web console until Ctrl-C")
    p.add_argument("--web-port", type=port_number, default=8080, metavar="PORT",
                   help="the console's port on 127.0.0.1 (default 8080; busy: a free one)")
    p.add_argument("--signed", action="store_true",
                   help="sign every item and head; the log service requires signatures")


DEMO_DESCRIPTION = (
    "Start nats-server, the log service and one worker per agent under supervisord in a "
    "temporary directory, play the seed's support conversation and an escalation to L2Support, "
    "print the transcripts, replay and verify both logs, and shut everything down.  Offline "
    "unless OPENAI_API_KEY is set."
)
