"""``convlog up`` and ``convlog demo``: the whole stack under supervisord.

``convlog up`` writes a supervisord config generated from the current
settings into ``DATA_DIR/supervisor/`` (nats-server when none answers at a
loopback URL, the log service, ``--workers-per-agent`` workers per agent) and
replaces itself with ``supervisord -n -c FILE``: the stack runs in the
foreground, SIGTERM or Ctrl-C stops all of it, and a program that dies is
restarted.  ``convlog demo`` is described in :mod:`services.cli.demo`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from shared.config import Settings
from shared.errors import UnavailableError

from .demo import packaged_agents_path, run_demo
from .stack import nats_answers, nats_server_binary
from .supervise import code_root, render_config, socket_path_for, stack_programs

__all__ = ["register", "up_config"]

EXIT_USAGE = 2


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def up_config(settings: Settings, *, agents_path: Path, agents: list[str],
              workers_per_agent: int, start_nats: bool) -> tuple[Path, str]:
    """The supervisord config ``convlog up`` runs: (path to write, text)."""
    from .main import is_loopback

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
        first = settings.nats_url.split(",")[0].strip()
        parsed = urlparse(first if "://" in first else f"nats://{first}")
        nats_command = [nats_server_binary(), "-a", parsed.hostname or "127.0.0.1",
                        "-p", str(parsed.port or 4222), "-js", "-sd", str(data_dir / "jetstream")]
    programs = stack_programs(
        agents=agents, agents_path=agents_path.resolve(), nats_url=settings.nats_url,
        db_path=settings.db_path.resolve(), nats_command=nats_command,
        workers_per_agent=workers_per_agent, grace=settings.grace,
    )
    environment = {
        "CONVLOG_NATS_URL": settings.nats_url,
        "CONVLOG_PREFIX": settings.prefix,
        "CONVLOG_DATA_DIR": str(data_dir),
        "CONVLOG_LOG_LEVEL": settings.log_level,
        "CONVLOG_EMBEDDED": "false",
        "PYTHONUNBUFFERED": "1",
    }
    text = render_config(programs, run_dir=run_dir, log_dir=log_dir, environment=environment,
                         directory=code_root())
    return run_dir / "supervisord.conf", text


async def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    from services.worker.spec import SpecError, load_spec

    if args.workers_per_agent < 1:
        _stderr("convlog up: --workers-per-agent must be at least 1")
        return EXIT_USAGE
    agents_path = settings.agents or packaged_agents_path()
    try:
        spec = load_spec(agents_path)
    except SpecError as e:
        _stderr(f"convlog up: {e}")
        return EXIT_USAGE
    start_nats = not nats_answers(settings.nats_url)
    path, text = up_config(settings, agents_path=Path(agents_path), agents=list(spec.agents),
                           workers_per_agent=args.workers_per_agent, start_nats=start_nats)
    path.parent.mkdir(parents=True, exist_ok=True)
    (settings.data_dir.resolve() / "logs").mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    if args.print_config:
        print(text, end="")
        return 0
    sock = socket_path_for(path.parent)
    _stderr(
        f"convlog up: {'nats-server, ' if start_nats else ''}log service and "
        f"{args.workers_per_agent} worker(s) for each of {', '.join(spec.agents)}\n"
        f"  NATS: {settings.nats_url}{' (started here)' if start_nats else ' (already running)'}\n"
        f"  config: {path}\n  logs: {settings.data_dir.resolve() / 'logs'}\n"
        f"  status: supervisorctl -s unix://{sock} status\n"
        "  Ctrl-C or SIGTERM stops everything"
    )
    argv = [sys.executable, "-m", "supervisor.supervisord", "-n", "-c", str(path)]
    os.execv(argv[0], argv)  # supervisord takes over this PID: signals reach it directly
    return 0  # pragma: no cover - execv does not return


async def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    return await run_demo(
        agents_path=Path(args.agents) if args.agents else None,
        offline=args.offline, keep=args.keep, turn_timeout=args.turn_timeout,
        web_port=args.web_port if args.web else None,
    )


def register(sub: Any, common: Callable[[argparse.ArgumentParser], None],
             commands: dict[str, Any]) -> None:
    p = sub.add_parser("up", help="run the whole stack in the foreground under supervisord")
    common(p)
    p.add_argument("--agents", help="agents TOML [CONVLOG_AGENTS, default: the packaged "
                   "reference scenario]")
    p.add_argument("--db", help="SQLite file [CONVLOG_DB, default DATA_DIR/convlog.db]")
    p.add_argument("--workers-per-agent", type=int, default=1, metavar="N",
                   help="replicas per agent; they share its durable consumer (default 1)")
    p.add_argument("--print-config", action="store_true",
                   help="write the supervisord config, print it and exit")
    commands["up"] = cmd_up

    p = sub.add_parser(
        "demo",
        help="start a private stack, play the seed's support conversations, verify, stop",
        description="Start nats-server, the log service and one worker per agent under "
        "supervisord in a temporary directory, play the seed's support conversation and an "
        "escalation to L2Support, print the transcripts, replay and verify both logs, and "
        "shut everything down.  Offline unless OPENAI_API_KEY is set.",
    )
    p.add_argument("--agents", help="agents TOML (default: the packaged reference scenario)")
    p.add_argument("--offline", action="store_true",
                   help="use the offline rules model even if OPENAI_API_KEY is set")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory and logs")
    p.add_argument("--turn-timeout", type=float, default=20.0, metavar="S",
                   help="seconds to wait for each turn's answer (default 20)")
    p.add_argument("--log-level", help="log level of the demo itself")
    p.add_argument("--web", action="store_true",
                   help="then keep the stack up and serve the web console until Ctrl-C")
    p.add_argument("--web-port", type=int, default=8080, metavar="PORT",
                   help="the console's port on 127.0.0.1 (default 8080; busy: a free one)")
    commands["demo"] = cmd_demo
