"""Checks the deploy tests run on configs: supervisord's own parser, convlog's own
command line parser, ``nats-server -t`` on flags, and ``systemd-analyze verify``."""

from __future__ import annotations

import subprocess
from pathlib import Path

from supervisor.options import ServerOptions

from services.cli.main import build_parser, settings_from
from services.worker.spec import load_spec

from .natsd import nats_server_binary
from .procs import REPO_ROOT

__all__ = ["AGENTS", "DEPLOY", "nats_flags_are_valid", "parse_convlog", "supervisor_options", "systemd_verify"]

DEPLOY = REPO_ROOT / "deploy"
AGENTS = list(load_spec(DEPLOY / "agents.toml").agents)
"""The agents of ``deploy/agents.toml``, in order."""


def supervisor_options(conf: Path) -> ServerOptions:
    """``conf`` as supervisord reads it."""
    opts = ServerOptions()
    opts.realize(args=["-c", str(conf)])
    return opts


def parse_convlog(argv: list[str]) -> object:
    """Parse a convlog command line with convlog's own parser (SystemExit on a bad one)."""
    args = build_parser().parse_args(argv)
    settings_from(args)  # flags convert to valid settings too
    return args


def nats_flags_are_valid(flags: list[str], tmp_path: Path) -> None:
    """``nats-server -t`` needs a config file: check the flags against an empty one."""
    empty = tmp_path / "empty.conf"
    empty.write_text("server_name: flags-check\n")
    res = subprocess.run([nats_server_binary(), "-t", "-c", str(empty), *flags],
                         capture_output=True, text=True, timeout=30, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def systemd_verify(units: list[str]) -> None:
    """``systemd-analyze verify`` accepts the unit files ``units``."""
    res = subprocess.run(["systemd-analyze", "verify", "--man=no", *units],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
