"""The commands a person runs against a session: ``send``, ``tail``,
``replay`` and ``sessions``.

Every argument is checked before anything is written: ``send`` refuses an
empty message, text that is not UTF-8, an unknown ``--to`` agent or a
timeout of 0 without publishing anything (the log is append-only: a mistake
written there stays there).

``send`` prints every item of the turn it starts (handoffs, tool calls,
replies, with agent names) until the turn ends: the log holds the turn's
``reply`` or ``fail`` item (turn-derived ids, :mod:`services.worker.turn_ids`).
Exit 124 when it does not end in time, naming the agent it waits for (the last
handoff's target, else the last agent that wrote for the turn, else ``--to``'s when
the message started the session: the log ignores ``--to`` on a later one).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import os
import re
import signal
import stat
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from shared.config import Settings
from shared.errors import BadRequestError, NotFoundError, UnavailableError

from .common import (
    EXIT_FAIL,
    EXIT_OK,
    EXIT_TIMEOUT,
    connect_client,
    item_order,
    packaged_agents_path,
    positive_float,
    positive_int,
    stderr,
)

__all__ = [
    "cmd_replay", "cmd_send", "cmd_sessions", "cmd_tail",
    "replay_arguments", "send_arguments", "sessions_arguments", "tail_arguments",
]

SID_HELP = "session id: letters, digits, '_' and '-', 1 to 128 characters"
_ITEM_ID = re.compile(r"[A-Za-z0-9_.:@=+/-]{1,200}")  # shared.messages.ItemId


# -- send ----------------------------------------------------------------------------


def send_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("session_id", metavar="SID", help=SID_HELP)
    p.add_argument("text", metavar="TEXT", nargs="?",
                   help="the message (UTF-8); `-` reads it from standard input")
    p.add_argument("--file", metavar="PATH", dest="text_file",
                   help="read the message from this UTF-8 file instead of TEXT (- for standard input)")
    p.add_argument("--to", metavar="AGENT", help="entry agent, when this starts the session")
    p.add_argument("--agents", help="agents TOML naming the agents --to may pick [CONVLOG_AGENTS, "
                                    "default: the packaged seed support system]")
    p.add_argument("--timeout", type=positive_float, default=60.0, metavar="S",
                   help="seconds to wait for the turn to end (default 60; then exit 124)")
    p.add_argument("--id", dest="item_id", type=_item_id, metavar="ITEM_ID",
                   help="the message's item_id (default: a new one); sent again with the same id "
                        "it is stored once: how to retry after an unknown outcome (exit 3)")


def _item_id(value: str) -> str:
    if not _ITEM_ID.fullmatch(value):
        raise argparse.ArgumentTypeError(
            f"{value[:80]!r}: an item_id is 1 to 200 of letters, digits and _ . : @ = + / -")
    return value


def _decode_utf8(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequestError(f"{where} is not valid UTF-8 (byte {e.start} is {data[e.start]:#04x})") from None


def _interruptible(read: Callable[[], bytes]) -> bytes:
    """``read()``, which may block for as long as a person takes to type (standard
    input, a FIFO), with Ctrl-C raising ``KeyboardInterrupt`` in it (exit 130).
    asyncio.run's own Ctrl-C handler only cancels the command's task, which a blocking
    read never returns to: Ctrl-C was ignored, and an input closed after it sent
    nothing but said the message was empty."""
    handler = signal.getsignal(signal.SIGINT)
    if not callable(handler) or handler is signal.default_int_handler \
            or threading.current_thread() is not threading.main_thread():
        return read()  # Ctrl-C ignored, or already KeyboardInterrupt; or not ours to set
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return read()
    finally:
        signal.signal(signal.SIGINT, handler)


def message_text(args: argparse.Namespace) -> str:
    """The message to send, from TEXT, standard input (``-``, or ``--file -``) or ``--file``.

    Raises:
        BadRequestError: none or both given, unreadable, not UTF-8, or blank.
    """
    if args.text is not None and args.text_file is not None:
        raise BadRequestError("give the message as TEXT or with --file, not both")
    if args.text_file == "-":  # as TEXT `-`: the usual spelling of standard input for a file
        text = _decode_utf8(_interruptible(sys.stdin.buffer.read), "standard input").rstrip("\r\n")
    elif args.text_file is not None:
        path = Path(args.text_file)
        if path.is_dir():
            raise BadRequestError(f"--file {path}: is a directory")
        try:
            text = _decode_utf8(_interruptible(path.read_bytes), f"--file {path}").rstrip("\r\n")
        except FileNotFoundError:
            raise BadRequestError(f"--file {path}: no such file") from None
        except OSError as e:
            raise BadRequestError(f"--file {path}: cannot read it: {e.strerror}") from None
    elif args.text == "-":
        text = _decode_utf8(_interruptible(sys.stdin.buffer.read), "standard input").rstrip("\r\n")
    elif args.text is not None:
        # Undecodable argv bytes arrive as surrogate escapes: get the bytes back.
        text = _decode_utf8(os.fsencode(args.text), "TEXT")
    else:
        raise BadRequestError("no message: give TEXT, `-` to read standard input, or --file PATH")
    if not text.strip():
        raise BadRequestError("the message is empty (or only whitespace); nothing was sent")
    return text


async def _known_agents(client: Any, settings: Settings) -> tuple[set[str], str]:
    """Agents a session may start at: the spec's, and every agent whose worker
    has a durable consumer on this deployment's work stream."""
    import nats.errors
    import nats.js.errors

    from services.worker.spec import SpecError, load_spec

    path = settings.agents or packaged_agents_path()
    try:
        known = set(load_spec(path).agents)
    except SpecError as e:
        raise BadRequestError(f"bad agent spec: {e}") from e
    where = f"the spec {path}"
    js = client.nc.jetstream()
    from shared.follow import unless_denied
    from shared.work import work_stream_name

    listing = asyncio.ensure_future(js.consumers_info(work_stream_name(client.subjects)))
    # A user that may not list them (the `client` role, the gateway): the server refuses
    # the request and no answer comes; do not wait out the JetStream timeout for it.
    try:
        await unless_denied(listing, client.consumers_denied)
    finally:
        if not listing.done():
            listing.cancel()
    try:
        infos = listing.result() if listing.done() and not listing.cancelled() else []
    except (nats.js.errors.Error, nats.errors.Error, TimeoutError):
        infos = []
    running = {i.name.removeprefix("convlog-agent-") for i in infos
               if i.name and i.name.startswith("convlog-agent-")}
    if running - known:
        where += " and the deployment's workers"
    return known | running, where


async def cmd_send(args: argparse.Namespace, settings: Settings) -> int:
    from services.worker.turn_ids import parse_turn_item_id, turn_key
    from shared.client import new_item_id
    from shared.routing import handoff_target_of
    from shared.signing import writes_as
    from shared.subjects import validate_session_id

    from .render import printable, render_line

    validate_session_id(args.session_id)
    text = message_text(args)
    client = await connect_client(settings)
    try:
        if args.to is not None:
            known, where = await _known_agents(client, settings)
            if args.to not in known:
                raise BadRequestError(f"--to {args.to!r}: no such agent in {where}; known: "
                                      f"{', '.join(sorted(known))}; nothing was sent")
        item_id = args.item_id or new_item_id()
        turn = turn_key(item_id)
        try:
            ack = await client.send(args.session_id, text, to=args.to, item_id=item_id)
        except UnavailableError as e:
            raise UnavailableError(
                f"{e.message}; the message may or may not be stored: to retry without writing it "
                f"twice, send it again with --id {item_id}") from e
        except asyncio.CancelledError:  # Ctrl-C before the log answered: the outcome is as unknown
            stderr(f"convlog send: interrupted before the log answered: the message may or may not be "
                   f"stored: to retry without writing it twice, send it again with --id {item_id}")
            raise
        user_order = ack.items[0].item_order
        again = " (already stored: this id was sent before)" if ack.items[0].duplicate else ""
        stderr(f"sent #{user_order} to {args.session_id}{again}")
        # The agent the turn waits for, as far as its items say (and where it was handed it).
        # --to picks the entry agent of a new session only: the log ignores it later on.
        started = user_order == 1
        waiting: str | None = args.to if started else None
        handed: int | None = None
        try:
            # aclosing: a follower left suspended keeps its consumer, whose unread messages
            # made the close's drain wait out nats-py's 30 s.
            async with asyncio.timeout(args.timeout), contextlib.aclosing(client.follow(
                    args.session_id, after=user_order, idle_check=1.0, wait_out=False)) as items:
                async for env in items:
                    tid = parse_turn_item_id(env.item_id)
                    if tid is None or tid.turn != turn:
                        continue  # other turns of a busy session
                    if not writes_as(tid.agent, env.agent):  # forged: its worker answers under its next step
                        stderr(f"convlog send: #{env.item_order} was written as {env.agent!r} under "
                               f"{tid.agent}'s turn id {env.item_id!r}: not {tid.agent}'s, not shown")
                        continue
                    print(render_line(env, width=0), flush=True)
                    if tid.terminal:
                        return EXIT_OK
                    target = handoff_target_of(env.kind, env.data)
                    waiting, handed = (target, env.item_order) if target is not None else (tid.agent, None)
        except UnavailableError as e:  # the log service stopped answering, not the turn
            raise UnavailableError(
                f"following the turn of #{user_order} in {args.session_id} (the message is stored): "
                f"{e.message}; see it with `convlog tail {args.session_id} --after {user_order - 1}` "
                "once the log service is back") from e
        except TimeoutError:
            if waiting is None:
                why = "is a worker running for the session's active agent?"
                if args.to is not None and not started:
                    why += f" (--to {args.to} was not used: it picks the agent of a new session only)"
            else:
                since = f", handed the turn at #{handed}" if handed is not None else ""
                why = f"waiting for {printable(waiting)}{since}: is a worker running for {printable(waiting)}?"
            stderr(f"convlog send: the turn of #{user_order} did not end within {args.timeout:g}s ({why})")
            return EXIT_TIMEOUT
    finally:
        await client.close()
    return EXIT_OK


# -- tail, sessions ------------------------------------------------------------------


def tail_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("session_id", metavar="SID", help=SID_HELP)
    p.add_argument("--after", type=item_order, default=None, metavar="ORDER",
                   help="start after this item_order (default: show the last 10 first)")
    p.add_argument("--count", type=positive_int, default=None, metavar="N",
                   help="exit after this many items (default: follow until Ctrl-C)")


async def cmd_tail(args: argparse.Namespace, settings: Settings) -> int:
    from shared.subjects import validate_session_id

    from .render import render_line

    validate_session_id(args.session_id)
    client = await connect_client(settings)
    try:
        after = args.after
        if after is None:
            last = await client.last_order(args.session_id)
            after = max(0, last - 10)
            if last == 0:  # else a mistyped id looks just like a quiet session
                stderr(f"convlog tail: session {args.session_id!r} has no items yet; "
                       "waiting for its first (Ctrl-C to stop)")
        seen = 0
        # aclosing: a follower left suspended after --count keeps its consumer, whose
        # unread messages made the close's drain wait out nats-py's 30 s.
        with _ended_when_the_reader_is_gone():
            async with contextlib.aclosing(client.follow(args.session_id, after=after)) as items:
                async for env in items:
                    print(render_line(env), flush=True)
                    seen += 1
                    if args.count is not None and seen >= args.count:
                        break
    finally:
        await client.close()
    return EXIT_OK


@contextlib.contextmanager
def _ended_when_the_reader_is_gone() -> Iterator[None]:
    """End the command (``BrokenPipeError``: exit 0, as a print into a closed pipe
    does) as soon as standard output is a pipe whose reader has gone.

    ``convlog tail s | head -1`` on a quiet session: head took its line and
    exited, but tail learned it only at its next print, so the pipeline hung
    until the session's next item, if one ever came.  A pipe's write end
    polls as an error once no reader is left (Linux, the BSDs), which asyncio
    hands to a reader callback.  Anything else (a terminal, a file) is left
    alone: a terminal polls readable when a key is typed.
    """
    try:
        fd = sys.stdout.fileno()
        # Write-only: a FIFO opened to read too polls readable with our own output in it.
        piped = stat.S_ISFIFO(os.fstat(fd).st_mode) \
            and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_WRONLY
    except (AttributeError, OSError, ValueError):  # no real standard output
        piped = False
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    gone = False

    def hung_up() -> None:
        nonlocal gone
        loop.remove_reader(fd)
        if not gone and task is not None:
            gone = True
            task.cancel()

    try:
        if piped:
            loop.add_reader(fd, hung_up)
    except (OSError, ValueError, NotImplementedError):  # a loop that cannot watch it
        piped = False
    try:
        yield
    except asyncio.CancelledError:
        if gone and task is not None and task.uncancel() == 0:
            raise BrokenPipeError("the reader of standard output is gone") from None
        raise
    finally:
        if piped and not gone:
            loop.remove_reader(fd)


def sessions_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--limit", type=positive_int, default=None, metavar="N",
                   help="list at most this many sessions (default: all)")


async def cmd_sessions(args: argparse.Namespace, settings: Settings) -> int:
    client = await connect_client(settings)
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


# -- replay --------------------------------------------------------------------------


def replay_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("session_id", metavar="SID", help=SID_HELP)
    p.add_argument("--format", dest="fmt", choices=["text", "jsonl"], default="text",
                   help="text: one readable line per item (default); jsonl: the envelopes, "
                        "an export --file reads back")
    p.add_argument("--verify", action="store_true",
                   help="check contiguity and the hash chain; exit 1 naming the first bad item")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--db", metavar="PATH",
                     help="read this SQLite file directly (no service needed)")
    src.add_argument("--file", metavar="PATH", help="read a JSONL export instead of the service")
    p.add_argument("--quiet", action="store_true", help="with --verify: print only the verdict")
    p.add_argument("--keyring", help="with --verify: check every signature [CONVLOG_KEYRING]")


def _export_file(path: Path) -> Path:
    if path.is_dir():
        raise BadRequestError(f"--file {path}: is a directory, not a JSONL export")
    if not path.exists():
        raise NotFoundError(f"--file {path}: no such file")
    try:
        path.open("rb").close()
    except OSError as e:
        raise BadRequestError(f"--file {path}: cannot read it: {e.strerror}") from None
    return path


async def cmd_replay(args: argparse.Namespace, settings: Settings) -> int:
    from shared.messages import Envelope
    from shared.subjects import validate_session_id

    from .replay import Replayer, envelopes_from_db, envelopes_from_file, replay_from_service

    validate_session_id(args.session_id)
    from shared.signing import Keyring

    quiet = args.quiet and args.verify
    keyring = Keyring.load(settings.keyring) if settings.keyring else None
    rep = Replayer(sys.stdout, fmt=args.fmt, quiet=quiet, keyring=keyring, verify=args.verify)
    undecodable: list[str] = []
    where = f"--db {args.db}" if args.db else f"--file {args.file}" if args.file else "the log service"
    what = "line" if args.file else "item_order" if not args.db else "row of item_order"

    def named(env: Any) -> Any:
        error = None if isinstance(env, Envelope) else getattr(env, "error", None)
        if error is not None:  # a line or row that does not decode (not a _BadRow)
            undecodable.append(f"{where}: {what} {env.item_order} is not a convlog envelope: {error}")
        return env

    if args.db or args.file:
        if args.db:
            rep.audit.keep = frozenset()  # a database holds no signed head: no hash to keep
            source = envelopes_from_db(Path(args.db), args.session_id)
        else:
            source = envelopes_from_file(_export_file(Path(args.file)), args.session_id)
        rep.run_sync(map(named, source), args.session_id)
        if rep.count == 0 and undecodable:
            raise BadRequestError(f"{where} holds no convlog envelopes ({undecodable[0]})")
        if rep.count == 0 and all(h.session_id != args.session_id for h in rep.audit.heads):
            # the signed heads of another session's export say nothing of this one
            raise NotFoundError(f"session {args.session_id!r} has no items")
    else:
        client = await connect_client(settings)
        try:
            await replay_from_service(client, args.session_id, rep, named)
        finally:
            await client.close()
    if rep.pipe_closed:  # `replay --verify | head`: what is left unflushed goes nowhere, the verdict counts
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    if rep.count == 0 and rep.problem is None:
        raise NotFoundError(f"session {args.session_id!r} has no items")
    if args.verify:
        if rep.problem is not None:
            print(f"FAILED: {args.session_id}: {rep.problem}", file=sys.stderr)
            return EXIT_FAIL
        print(f"verified: {args.session_id}: {rep.count} items, orders 1..{rep.count} contiguous, "
              f"hash chain intact; {rep.audit.summary(rep.count)}", file=sys.stderr)
    elif undecodable:
        stderr(f"convlog replay: {undecodable[0]} (--verify checks the whole session)")
        return EXIT_FAIL
    return EXIT_OK
