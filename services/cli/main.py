"""``convlog``: argument parsing and dispatch only.

Exit codes: 0 ok; 1 verification failed or the command failed; 2 usage or
bad input; 3 NATS or the log service unavailable; 124 a timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from shared.config import ConfigError, Settings, load_settings
from shared.errors import BadRequestError, ConvlogError, NotFoundError, UnavailableError

__all__ = ["main"]

log = logging.getLogger("convlog")

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_TIMEOUT = 0, 1, 2, 3, 124
CLI_DEADLINE = 8.0


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("connection and storage (flags > CONVLOG_* env > defaults)")
    g.add_argument("--nats-url", help="NATS server URL(s), comma-separated [CONVLOG_NATS_URL]")
    g.add_argument("--prefix", help="subject prefix [CONVLOG_PREFIX, default convlog]")
    g.add_argument("--data-dir", help="data directory [CONVLOG_DATA_DIR]")
    g.add_argument("--creds", help="NATS credentials file [CONVLOG_CREDS]")
    g.add_argument("--log-level", help="DEBUG, INFO, WARNING [CONVLOG_LOG_LEVEL]")
    g.add_argument("--no-embedded", dest="embedded", action="store_const", const=False,
                   help="never start a local nats-server [CONVLOG_EMBEDDED=false]")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convlog",
        description="Event-sourced conversation log for multi-agent AI systems, over NATS.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("log", help="run the log service")
    _common(p)
    p.add_argument("--db", help="SQLite file [CONVLOG_DB, default DATA_DIR/convlog.db]")

    p = sub.add_parser("replay", help="audit replay of every envelope of a session")
    _common(p)
    p.add_argument("session_id", metavar="SID")
    p.add_argument("--format", dest="fmt", choices=["text", "jsonl"], default="text")
    p.add_argument("--verify", action="store_true", help="check contiguity and the hash chain")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--db", help="read this SQLite file directly (no service needed)")
    src.add_argument("--file", help="read a JSONL export instead of the service")
    p.add_argument("--quiet", action="store_true", help="with --verify: print only the verdict")

    p = sub.add_parser("sessions", help="list sessions")
    _common(p)
    p.add_argument("--limit", type=int, default=None, help="at most this many")

    p = sub.add_parser("tail", help="follow a session live")
    _common(p)
    p.add_argument("session_id", metavar="SID")
    p.add_argument("--after", type=int, default=None,
                   help="start after this item_order (default: show the last 10 first)")
    p.add_argument("--count", type=int, default=None, help="exit after this many items")

    from .commands_ext import register_extra

    register_extra(sub, _common)
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    keys = ("nats_url", "prefix", "data_dir", "creds", "log_level", "embedded", "db", "agents")
    return load_settings({k: getattr(args, k, None) for k in keys})


def is_loopback(url: str) -> bool:
    first = url.split(",")[0].strip()
    host = urlparse(first if "://" in first else f"nats://{first}").hostname or ""
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")


def maybe_embedded_nats(settings: Settings) -> Any:
    """Start a local nats-server when none answers at a loopback URL (embedded default)."""
    from .stack import EmbeddedNats, nats_answers

    if nats_answers(settings.nats_url):
        return None
    if not settings.embedded or not is_loopback(settings.nats_url):
        raise UnavailableError(
            f"no NATS server answers at {settings.nats_url} (start one, or allow the embedded "
            "server by unsetting CONVLOG_EMBEDDED=false and using a loopback URL)"
        )
    first = settings.nats_url.split(",")[0].strip()
    parsed = urlparse(first if "://" in first else f"nats://{first}")
    server = EmbeddedNats(settings.data_dir / "nats", host=parsed.hostname or "127.0.0.1",
                          port=parsed.port or 4222)
    server.start()
    log.info("started embedded nats-server at %s (data in %s)", server.url, server.data_dir)
    return server


def require_nats(settings: Settings) -> None:
    from .stack import nats_answers

    if not nats_answers(settings.nats_url):
        raise UnavailableError(
            f"no NATS server answers at {settings.nats_url}; start the stack with `convlog up` "
            "(or `convlog log`), or set CONVLOG_NATS_URL"
        )


def install_signal_handlers(on_signal: Callable[[], Awaitable[None]]) -> set[asyncio.Task[None]]:
    """SIGTERM/SIGINT start a graceful shutdown (once)."""
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    def fire() -> None:
        if not tasks:
            tasks.add(loop.create_task(on_signal()))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, fire)
    return tasks


async def cmd_log(args: argparse.Namespace, settings: Settings) -> int:
    from services.log.service import LogService

    server = maybe_embedded_nats(settings)
    try:
        service = LogService(settings)
        _keep = install_signal_handlers(service.shutdown)
        try:
            await service.start()
            # What exists now lives as long as the process: keep it out of the
            # cyclic GC, so a full collection under load scans only what came
            # since (one had paused appends for 10-25 ms).
            gc.freeze()
            await service.run()
        except BaseException:
            await service.shutdown()
            raise
        del _keep
    finally:
        if server is not None:
            server.stop()
    return EXIT_OK


async def _client(settings: Settings) -> Any:
    from shared.client import LogClient

    require_nats(settings)
    client = await LogClient.connect(settings=settings, name="convlog-cli")
    # A person is waiting: give up on a missing log service within seconds.
    client.deadline = CLI_DEADLINE
    return client


async def cmd_replay(args: argparse.Namespace, settings: Settings) -> int:
    from .replay import Replayer, envelopes_from_db, envelopes_from_file, replay_from_service

    quiet = args.quiet and args.verify
    rep = Replayer(sys.stdout, fmt=args.fmt, quiet=quiet)
    if args.db or args.file:
        from shared.subjects import validate_session_id

        validate_session_id(args.session_id)
        source = (
            envelopes_from_db(Path(args.db), args.session_id)
            if args.db
            else envelopes_from_file(Path(args.file), args.session_id)
        )
        rep.run_sync(source, args.session_id)
    else:
        client = await _client(settings)
        try:
            await replay_from_service(client, args.session_id, rep)
        finally:
            await client.close()
    if rep.count == 0 and rep.problem is None:
        raise NotFoundError(f"session {args.session_id!r} has no items")
    if args.verify:
        if rep.problem is not None:
            print(f"FAILED: {args.session_id}: {rep.problem}", file=sys.stderr)
            return EXIT_FAIL
        print(f"verified: {args.session_id}: {rep.count} items, orders 1..{rep.count} contiguous, "
              "hash chain intact", file=sys.stderr)
    return EXIT_OK


async def cmd_sessions(args: argparse.Namespace, settings: Settings) -> int:
    client = await _client(settings)
    try:
        n = 0
        print(f"{'SESSION':<40} {'LAST':>7}  UPDATED")
        async for s in client.iter_sessions():
            print(f"{s.session_id:<40} {s.last_order:>7}  {s.updated_at}")
            n += 1
            if args.limit is not None and n >= args.limit:
                break
    finally:
        await client.close()
    return EXIT_OK


async def cmd_tail(args: argparse.Namespace, settings: Settings) -> int:
    from .render import render_line

    client = await _client(settings)
    try:
        after = args.after
        if after is None:
            last = await client.last_order(args.session_id)
            after = max(0, last - 10)
        seen = 0
        async for env in client.follow(args.session_id, after=after):
            print(render_line(env), flush=True)
            seen += 1
            if args.count is not None and seen >= args.count:
                break
    finally:
        await client.close()
    return EXIT_OK


COMMANDS: dict[str, Callable[[argparse.Namespace, Settings], Awaitable[int]]] = {
    "log": cmd_log,
    "replay": cmd_replay,
    "sessions": cmd_sessions,
    "tail": cmd_tail,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = settings_from(args)
    except ConfigError as e:
        print(f"convlog: configuration error: {e}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(
        level=getattr(logging, settings.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from .commands_ext import EXTRA_COMMANDS

    handler = {**COMMANDS, **EXTRA_COMMANDS}[args.command]
    try:
        return asyncio.run(handler(args, settings))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `convlog replay ... | head`
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except UnavailableError as e:
        print(f"convlog: unavailable: {e.message}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except (BadRequestError, NotFoundError) as e:
        print(f"convlog: {e.code}: {e.message}", file=sys.stderr)
        return EXIT_USAGE
    except ConvlogError as e:
        print(f"convlog: {e.code}: {e.message}", file=sys.stderr)
        return EXIT_FAIL
    except (FileNotFoundError, RuntimeError) as e:
        print(f"convlog: {e}", file=sys.stderr)
        return EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
