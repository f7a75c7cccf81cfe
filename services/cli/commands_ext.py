"""Registry of the commands that live in their own modules (bench, workers, demo)."""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["EXTRA_COMMANDS", "register_extra"]

EXTRA_COMMANDS: dict[str, Callable[[argparse.Namespace, Any], Awaitable[int]]] = {}


def register_extra(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add the subcommands defined outside main.py.

    Each module exposes ``register(sub, common, commands)`` which adds its
    parser(s) and its handler(s) to ``commands``.
    """
    for register in _registrars():
        register(sub, common, EXTRA_COMMANDS)


def _registrars() -> list[Callable[..., None]]:
    from services.web import cli as web

    from . import bench, stack_cmds, worker_cmds

    return [bench.register, stack_cmds.register, worker_cmds.register, web.register]
