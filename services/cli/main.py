"""``convlog``: argument parsing and dispatch only.

The commands are the table in :mod:`services.cli.commands`; every user
mistake ends in one line on stderr and the exit code below.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from services.logfmt import JsonFormatter, configure_logging
from shared import __version__
from shared.config import ConfigError, Settings, load_settings
from shared.errors import (
    BadRequestError,
    ConvlogError,
    NotFoundError,
    TooLargeError,
    UnavailableError,
)

from .commands import COMMANDS, Command
from .common import (
    EXIT_FAIL,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    Parser,
    connection_arguments,
    setting_source,
)

__all__ = ["build_parser", "main", "settings_from"]

EXIT_CODES = """\
exit codes:
  0    ok
  1    failed: verification found a bad item, a bench lost or doubled items, or the command could not finish
  2    bad input or usage: arguments, configuration, a path, a refused request
  3    NATS or the log service is not reachable or not running
  124  a timeout (e.g. `convlog send` waiting for the turn)
  130  interrupted (Ctrl-C)"""

#: Settings fields a command's flags may set (flags > CONVLOG_* env > defaults).
SETTINGS_FLAGS = ("nats_url", "prefix", "data_dir", "creds", "log_level", "embedded", "db", "agents", "store",
                  "keyring", "require_signatures", "metrics_port")

#: What the user must fix: exit 2.
USER_ERRORS = (BadRequestError, NotFoundError, TooLargeError)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="convlog",
        description="Event-sourced conversation log for multi-agent AI systems, over NATS.",
        epilog=EXIT_CODES + "\n\nconfiguration: flags > CONVLOG_* environment variables > "
        "defaults (see the README).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"convlog {__version__}",
                        help="print convlog's version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                title="commands")
    for cmd in COMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.description or cmd.help,
                           epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
        cmd.arguments(p)
        if cmd.connection:
            connection_arguments(p)
    return parser


def settings_from(args: argparse.Namespace, *, check_paths: bool = True) -> Settings:
    """Settings from a command's flags, ``CONVLOG_*`` variables and defaults."""
    settings = load_settings({k: getattr(args, k, None) for k in SETTINGS_FLAGS},
                             check_paths=check_paths)
    if check_paths:
        from shared.signing import check_key_files

        check_key_files(settings, named=lambda name: setting_source(args, name))
    return settings


def command(name: str) -> Command:
    return next(c for c in COMMANDS if c.name == name)


def _report(prog: str, e: BaseException | str, *, as_json: bool = False) -> None:
    line = f"{prog}: {e}"
    if as_json:  # CONVLOG_LOG_FORMAT=json: this line is one JSON object too (whatever the level)
        line = JsonFormatter().format(logging.LogRecord("convlog", logging.ERROR, __file__, 0, line, None, None))
    print(line, file=sys.stderr, flush=True)


def _json_logs_asked() -> bool:
    """``CONVLOG_LOG_FORMAT=json``, when another setting is what could not be parsed."""
    try:
        fmt = load_settings(environ={"CONVLOG_LOG_FORMAT": os.environ.get("CONVLOG_LOG_FORMAT", "")},
                            check_paths=False).log_format
    except ConfigError:
        return False
    return fmt == "json"


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line.  argparse gives an optional positional only the words
    before the first option, so ``convlog send SID --to AGENT TEXT`` left TEXT
    over as an unrecognized argument: a word left over is that TEXT."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "send" and args.text is None and extra and (extra[0] == "-" or extra[0][:1] != "-"):
        args.text = extra.pop(0)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    prog = f"convlog {args.command}"
    try:
        # A command without a connection (keys) uses no file the settings name: it
        # makes them (CONVLOG_KEYRING, CONVLOG_SIGNING_KEY may name what it creates).
        settings = settings_from(args, check_paths=command(args.command).connection)
    except ConfigError as e:
        _report(prog, f"configuration error: {e.message}", as_json=_json_logs_asked())
        return EXIT_USAGE
    configure_logging(settings)
    as_json = settings.log_format == "json"
    try:
        return asyncio.run(command(args.command).run(args, settings))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `convlog replay ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except ConfigError as e:
        _report(prog, e.message, as_json=as_json)
        return EXIT_USAGE
    except UnavailableError as e:
        _report(prog, f"unavailable: {e.message}", as_json=as_json)
        return EXIT_UNAVAILABLE
    except USER_ERRORS as e:
        _report(prog, f"{e.code}: {e.message}", as_json=as_json)
        return EXIT_USAGE
    except ConvlogError as e:
        _report(prog, f"{e.code}: {e.message}", as_json=as_json)
        return EXIT_FAIL
    except OSError as e:  # a storage fault after start-up: name the path, no traceback
        where = f" ({e.filename})" if e.filename else ""
        _report(prog, f"{e.strerror or e}{where}", as_json=as_json)
        return EXIT_FAIL
    except RuntimeError as e:
        _report(prog, str(e), as_json=as_json)
        return EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
