"""Every ``convlog`` command, in one table.

A command is one :class:`Command` entry: its name, a one-line help, the
function that adds its own arguments and the coroutine that runs it.  The
table is built once at import and never changed; :mod:`services.cli.main`
turns it into the parser and dispatches through it.  Command modules import
:mod:`services.cli.common`, never this module or ``main``, so imports run one
way.  Heavy imports (the log service, the worker, the benches) happen inside
the handlers, so ``convlog --help`` stays fast.
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from services.bench.cli import bench_arguments, cmd_bench
from services.web import cli as web
from shared.config import Settings

from .health import HEALTH_DESCRIPTION, cmd_health, health_arguments
from .keys_cmds import cmd_keys, keys_arguments
from .log_cmd import cmd_log, log_arguments
from .migrate import cmd_migrate, migrate_arguments
from .session_cmds import (
    cmd_replay,
    cmd_send,
    cmd_sessions,
    cmd_tail,
    replay_arguments,
    send_arguments,
    sessions_arguments,
    tail_arguments,
)
from .stack_cmds import DEMO_DESCRIPTION, cmd_demo, cmd_up, demo_arguments, up_arguments
from .worker_cmds import cmd_worker, worker_arguments

__all__ = ["COMMANDS", "Command"]

Handler = Callable[[argparse.Namespace, Settings], Awaitable[int]]


@dataclass(frozen=True, slots=True)
class Command:
    """One ``convlog`` subcommand.

    Attributes:
        name: the verb (``convlog NAME``).
        help: one line, shown in ``convlog --help``.
        arguments: adds the command's own arguments to its parser.
        run: the handler; returns the exit code, raises ``ConvlogError`` for
            what the user must fix (mapped to an exit code by ``main``).
        connection: also add the connection and storage options
            (``--nats-url``, ``--prefix``, ``--data-dir``, ...).
        description: the longer text of ``convlog NAME --help`` (default: ``help``).
    """

    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Handler
    connection: bool = True
    description: str | None = None


COMMANDS: tuple[Command, ...] = (
    Command("demo", "start a private stack, play the seed's support conversations, verify, stop",
            demo_arguments, cmd_demo, connection=False, description=DEMO_DESCRIPTION),
    Command("up", "run the whole stack in the foreground under supervisord",
            up_arguments, cmd_up),
    Command("log", "run the log service (starts a local nats-server if none answers)",
            log_arguments, cmd_log),
    Command("worker", "run the worker of one agent (run it again for replicas)",
            worker_arguments, cmd_worker),
    Command("send", "send a user message and print the replies of its turn",
            send_arguments, cmd_send),
    Command("tail", "follow a session live, handoffs included",
            tail_arguments, cmd_tail),
    Command("replay", "audit replay of every envelope of a session, optionally verified",
            replay_arguments, cmd_replay),
    Command("sessions", "list sessions", sessions_arguments, cmd_sessions),
    Command("bench", "load the log service (or time agent turns); print throughput and latency",
            bench_arguments, cmd_bench),
    Command("web", "serve the read-only web audit console", web.web_arguments, web.run,
            description=web.WEB_DESCRIPTION),
    Command("migrate", "copy sessions between the SQLite and JetStream stores, verified",
            migrate_arguments, cmd_migrate),
    Command("keys", "make or rotate the signing keys (init | rotate)", keys_arguments, cmd_keys,
            connection=False),
    Command("health", "exit 0 if the log service, the fan-out and every agent's consumer are "
            "healthy; else 1, naming what is wrong", health_arguments, cmd_health,
            description=HEALTH_DESCRIPTION),
)
