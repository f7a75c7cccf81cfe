"""Every user mistake gets one line on stderr and the documented exit code.

Each case drives the real CLI (``python -m services.cli.main ...`` as a
subprocess).  The cases in the first table need no server and start none
(NATS points at a port where nothing listens, the embedded server is off);
the rest run against a real nats-server and log service and check that the
refused input left the log unchanged.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import re
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path

import nats
import pytest

from shared.client import LogClient
from tests.support.natsd import NatsServer, free_port
from tests.support.procs import REPO_ROOT, python_module, run_cli

EXIT_FAIL, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_TIMEOUT = 1, 2, 3, 124


def cli_env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVLOG_")}
    env.update(CONVLOG_DATA_DIR=str(tmp / "data"), CONVLOG_EMBEDDED="false",
               CONVLOG_NATS_URL=f"nats://127.0.0.1:{free_port()}", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def _without_root_powers() -> None:
    """In the child: drop the capabilities that let root write where the mode says no.

    Tests may run as root, which ignores file modes; a read-only directory
    must be read-only for the CLI under test too.  PR_CAPBSET_DROP (24) of
    CAP_DAC_OVERRIDE (1), CAP_DAC_READ_SEARCH (2) and CAP_FOWNER (3) before exec.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2, 3):
        if libc.prctl(24, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


async def convlog(tmp: Path, *args: str, env: dict[str, str] | None = None,
                  stdin: bytes | None = None, unprivileged: bool = False) -> tuple[int, str, str]:
    """Run ``python -m services.cli.main ARGS``; return (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli.main", *args,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=env or cli_env(tmp), cwd=REPO_ROOT,
        preexec_fn=_without_root_powers if unprivileged and os.geteuid() == 0 else None,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode(errors="replace")


def one_line(err: str) -> str:
    """The single line a mistake prints (and never a traceback)."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


# -- no server needed ---------------------------------------------------------------


def _dir(tmp: Path) -> Path:
    (tmp / "adir").mkdir(exist_ok=True)
    return tmp / "adir"


def _file(tmp: Path) -> Path:
    (tmp / "afile").write_text("x\n")
    return tmp / "afile"


def _foreign_sqlite(tmp: Path, name: str = "other.db") -> Path:
    path = tmp / name
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE notes (body TEXT)")
    conn.commit()
    conn.close()
    return path


Case = tuple[str, Callable[[Path], list[str]], dict[str, str], int, list[str]]

CASES: list[Case] = [
    ("nats-url port out of range", lambda t: ["sessions"],
     {"CONVLOG_NATS_URL": "nats://127.0.0.1:99999"}, EXIT_USAGE,
     ["CONVLOG_NATS_URL", "99999", "port"]),
    ("nats-url port not a number", lambda t: ["sessions"],
     {"CONVLOG_NATS_URL": "nats://127.0.0.1:abc"}, EXIT_USAGE, ["CONVLOG_NATS_URL", "abc"]),
    ("--nats-url flag named", lambda t: ["tail", "s", "--nats-url", "nats://h:70000"], {},
     EXIT_USAGE, ["--nats-url", "70000"]),
    ("send text not UTF-8", lambda t: ["send", "s", os.fsdecode(b"caf\xe9")], {}, EXIT_USAGE,
     ["not valid UTF-8"]),
    ("replay --db a directory", lambda t: ["replay", "s", "--db", str(_dir(t))], {}, EXIT_USAGE,
     ["--db", "directory"]),
    ("replay --file a directory", lambda t: ["replay", "s", "--file", str(_dir(t))], {},
     EXIT_USAGE, ["--file", "directory"]),
    ("replay --file junk", lambda t: ["replay", "s", "--file", "/etc/passwd"], {}, EXIT_USAGE,
     ["/etc/passwd", "no convlog envelopes", "line 1"]),
    ("replay --file junk --verify", lambda t: ["replay", "s", "--file", "/etc/passwd", "--verify"],
     {}, EXIT_USAGE, ["/etc/passwd", "no convlog envelopes"]),
    ("--data-dir a file", lambda t: ["log", "--data-dir", str(_file(t))], {}, EXIT_USAGE,
     ["--data-dir", "not a directory"]),
    ("TLS CA missing", lambda t: ["sessions"], {"CONVLOG_TLS_CA": "/nonexistent"}, EXIT_USAGE,
     ["CONVLOG_TLS_CA", "/nonexistent", "does not exist"]),
    # A missing nkey seed file: a worker waited its whole --start-wait and exited 3 (unavailable),
    # convlog log exited 1 with "No such file or directory", neither naming the variable.
    ("nkey seed file missing", lambda t: ["sessions"], {"CONVLOG_NKEY": "/nonexistent"}, EXIT_USAGE,
     ["CONVLOG_NKEY", "/nonexistent", "does not exist"]),
    # A missing signing key or keyring was read only once NATS answered: with none, `send`
    # exited 3 and a worker waited out its --start-wait, both blaming NATS.
    ("signing key file missing: send", lambda t: ["send", "s", "hi"], {"CONVLOG_SIGNING_KEY": "/nonexistent"},
     EXIT_USAGE, ["CONVLOG_SIGNING_KEY", "/nonexistent", "does not exist"]),
    ("signing key file missing: worker", lambda t: ["worker", "Triage", "--start-wait", "2"],
     {"CONVLOG_SIGNING_KEY": "/nonexistent"}, EXIT_USAGE, ["CONVLOG_SIGNING_KEY", "/nonexistent", "does not exist"]),
    ("keyring file missing: worker", lambda t: ["worker", "Triage", "--start-wait", "2"],
     {"CONVLOG_KEYRING": "/nonexistent"}, EXIT_USAGE, ["CONVLOG_KEYRING", "/nonexistent", "does not exist"]),
    # A signing key or keyring file that is there but holds no key (no keyring) was read only
    # once NATS answered too: `convlog log` had started its nats-server (or waited out
    # --start-wait), a worker waited out its --start-wait, and both exited 3 blaming NATS.
    ("signing key not a seed: log", lambda t: ["log", "--start-wait", "2"],
     {"CONVLOG_SIGNING_KEY": "/etc/passwd"}, EXIT_USAGE,
     ["CONVLOG_SIGNING_KEY", "/etc/passwd", "not an nkey user seed"]),
    ("signing key not a seed: worker", lambda t: ["worker", "Triage", "--start-wait", "2"],
     {"CONVLOG_SIGNING_KEY": "/etc/passwd"}, EXIT_USAGE,
     ["CONVLOG_SIGNING_KEY", "/etc/passwd", "not an nkey user seed"]),
    ("keyring malformed: worker", lambda t: ["worker", "Triage", "--start-wait", "2"],
     {"CONVLOG_KEYRING": "/etc/passwd"}, EXIT_USAGE, ["CONVLOG_KEYRING", "/etc/passwd", "malformed"]),
    ("worker: signatures required without a keyring", lambda t: ["worker", "Triage", "--start-wait", "2"],
     {"CONVLOG_REQUIRE_SIGNATURES": "true"}, EXIT_USAGE, ["CONVLOG_REQUIRE_SIGNATURES", "CONVLOG_KEYRING"]),
    ("TLS CA not a certificate", lambda t: ["sessions"], {"CONVLOG_TLS_CA": "/etc/passwd"},
     EXIT_USAGE, ["CONVLOG_TLS_CA", "/etc/passwd", "cannot load"]),
    ("log --db an unrelated SQLite file", lambda t: ["log", "--db", str(_foreign_sqlite(t))], {},
     EXIT_USAGE, ["other.db", "not a convlog log", "notes"]),
    # '#' and '?' are part of the file's name, not of the read-only SQLite URI the check opens
    # (it opened, and created, "other " instead, found no tables and let the service use it).
    ("log --db an unrelated SQLite file named with # and ?",
     lambda t: ["log", "--db", str(_foreign_sqlite(t, "other #1?.db"))], {},
     EXIT_USAGE, ["other #1?.db", "not a convlog log", "notes"]),
    ("log --db in a missing directory", lambda t: ["log", "--db", str(t / "nope" / "x.db")], {},
     EXIT_USAGE, ["--db", "nope", "does not exist"]),
    ("log --db not SQLite", lambda t: ["log", "--db", "/etc/passwd"], {}, EXIT_USAGE,
     ["/etc/passwd", "not an SQLite database"]),
    ("send empty", lambda t: ["send", "s", ""], {}, EXIT_USAGE, ["empty", "nothing was sent"]),
    ("send whitespace", lambda t: ["send", "s", " \t\n "], {}, EXIT_USAGE, ["empty"]),
    ("send no message", lambda t: ["send", "s"], {}, EXIT_USAGE, ["no message", "--file"]),
    ("send --timeout 0", lambda t: ["send", "s", "hi", "--timeout", "0"], {}, EXIT_USAGE,
     ["--timeout", "'0'"]),
    ("tail --after -5", lambda t: ["tail", "s", "--after", "-5"], {}, EXIT_USAGE,
     ["--after", "'-5'"]),
    ("tail --count 0", lambda t: ["tail", "s", "--count", "0"], {}, EXIT_USAGE, ["--count"]),
    # Past the contract's largest order: it was sent, and refused in the service's words
    # ("invalid ReadRequest: Expected `int` <= 9007199254740991").
    ("tail --after 2**53", lambda t: ["tail", "s", "--after", str(2**53)], {}, EXIT_USAGE,
     ["--after", "an item order from 0 to 9007199254740991"]),
    ("sessions --limit 0", lambda t: ["sessions", "--limit", "0"], {}, EXIT_USAGE, ["--limit"]),
    ("log level", lambda t: ["sessions"], {"CONVLOG_LOG_LEVEL": "LOUD"}, EXIT_USAGE,
     ["CONVLOG_LOG_LEVEL", "LOUD", "DEBUG"]),
    ("commit batch 0", lambda t: ["log"], {"CONVLOG_COMMIT_BATCH": "0"}, EXIT_USAGE,
     ["CONVLOG_COMMIT_BATCH", ">= 1"]),
    ("stream replicas 0", lambda t: ["log"], {"CONVLOG_STREAM_REPLICAS": "0"}, EXIT_USAGE,
     ["CONVLOG_STREAM_REPLICAS"]),
    # JetStream keeps ack_wait as a Go duration: 1e20 s was refused only once the worker
    # created its consumer ("cannot unmarshal number ... time.Duration"), exit 1, a restart loop.
    ("worker --ack-wait beyond a day", lambda t: ["worker", "Triage", "--ack-wait", "1e20", "--start-wait", "0"],
     {}, EXIT_USAGE, ["--ack-wait", "to 86400", "'1e20'"]),
    # In-progress acks go at most every 0.2 s: a shorter ack wait redelivered every running turn.
    ("worker --ack-wait below a second", lambda t: ["worker", "Triage", "--ack-wait", "0.1", "--start-wait", "0"],
     {}, EXIT_USAGE, ["--ack-wait", "from 1 to 86400", "'0.1'"]),
    # A model URL without its scheme: the worker started, and every turn failed "Connection error."
    ("worker OPENAI_BASE_URL without a scheme", lambda t: ["worker", "Triage", "--start-wait", "0"],
     {"OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": "localhost:8000/v1"}, EXIT_USAGE,
     ["OPENAI_BASE_URL='localhost:8000/v1' is invalid", "http://"]),
    # `convlog up` started the stack with settings its programs refuse: each exited 2 at
    # every start until supervisord gave up on it, and the stack ran on without them.
    ("up: a model URL without a scheme", lambda t: ["up", "--print-config"],
     {"OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": "localhost:8000/v1"}, EXIT_USAGE,
     ["OPENAI_BASE_URL='localhost:8000/v1' is invalid", "http://"]),
    ("up: signatures required without a keyring", lambda t: ["up", "--print-config"],
     {"CONVLOG_REQUIRE_SIGNATURES": "true"}, EXIT_USAGE, ["CONVLOG_REQUIRE_SIGNATURES", "CONVLOG_KEYRING"]),
    # A name supervisord's UTF-8 configuration cannot hold: a traceback (UnicodeEncodeError), exit 1.
    ("up: a data directory whose name is not UTF-8",
     lambda t: ["up", "--print-config", "--data-dir", os.fsdecode(os.fsencode(t) + b"/caf\xe9")], {},
     EXIT_USAGE, ["--data-dir", "caf\\xe9", "is not UTF-8"]),
    ("no NATS server", lambda t: ["sessions"], {}, EXIT_UNAVAILABLE, ["no NATS server answers"]),
    ("unknown command", lambda t: ["frobnicate"], {}, EXIT_USAGE, ["invalid choice"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
async def test_a_mistake_gets_one_line_and_its_exit_code(case: Case, tmp_path: Path) -> None:
    _, argv, extra, code, words = case
    rc, out, err = await convlog(tmp_path, *argv(tmp_path), env=cli_env(tmp_path, **extra))
    line = one_line(err)
    assert rc == code, (rc, err)
    for word in words:
        assert word in line, (word, line)
    assert out == ""
    # Nothing was created next to the inputs (no log, no directory, no tables).
    assert not (tmp_path / "data").exists()
    assert not (tmp_path / "nope").exists()
    for other in (tmp_path / "other.db", tmp_path / "other #1?.db", tmp_path / "other "):
        if not other.exists():
            continue
        conn = sqlite3.connect(other)
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        conn.close()
        assert tables == {"notes"}, other


# -- storage faults ------------------------------------------------------------------


async def test_a_read_only_data_directory_is_named(tmp_path: Path) -> None:
    data = tmp_path / "ro-data"
    data.mkdir()
    data.chmod(0o555)
    try:
        rc, _, err = await convlog(tmp_path, "log", "--data-dir", str(data), unprivileged=True)
    finally:
        data.chmod(0o755)
    assert rc == EXIT_USAGE, err
    line = one_line(err)
    assert str(data) in line and "not writable" in line
    # Named as the user gave it (it said CONVLOG_DATA_DIR, a variable nobody set).
    assert line.startswith("convlog log: --data-dir: ") and "CONVLOG_DATA_DIR" not in line, line
    assert list(data.iterdir()) == []


async def test_a_read_only_lock_file_is_named(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    lock = data / "convlog.db.lock"
    lock.write_bytes(b"")
    lock.chmod(0o444)
    rc, _, err = await convlog(tmp_path, "log", unprivileged=True)
    assert rc == EXIT_USAGE, err
    line = one_line(err)
    assert str(lock) in line and "not writable" in line
    assert not (data / "convlog.db").exists()


# A log in WAL mode whose directory is read-only (a read-only mount, a wrong owner): its
# schema check could not open it (SQLite makes the -shm file even to read), and `convlog log`
# said "cannot read it: unable to open database file; refusing to use it as convlog's log",
# as if the file were not a log.
async def test_a_log_in_a_read_only_directory_is_said_not_writable(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    db = ro / "convlog.db"
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE items (session_id TEXT, item_order INTEGER, envelope BLOB)")
    conn.execute("CREATE TABLE sessions (session_id TEXT)")
    conn.commit()
    conn.close()
    ro.chmod(0o555)
    try:
        rc, _, err = await convlog(tmp_path, "log", "--db", str(db), unprivileged=True)
    finally:
        ro.chmod(0o755)
    assert rc == EXIT_USAGE, err
    line = one_line(err)
    assert line.startswith(f"convlog log: --db: {db}: ") and "not writable" in line, line
    assert "cannot read" not in line and "refusing" not in line, line
    assert sorted(p.name for p in ro.iterdir()) == ["convlog.db"]


# `replay --db` on a file SQLite cannot open ("unable to open database file") came out as a
# traceback, exit 1; `replay --file` on one it may not read said so with exit 1, where a bad
# path is exit 2 (as `send --file` says it).
@pytest.mark.parametrize(("flag", "name", "words"), [
    ("--db", "convlog.db", "cannot open"), ("--file", "export.jsonl", "cannot read"),
])
async def test_replay_of_an_unreadable_db_or_file_is_one_line_exit_2(
    tmp_path: Path, flag: str, name: str, words: str
) -> None:
    path = tmp_path / name
    if flag == "--db":
        conn = sqlite3.connect(path)
        conn.execute("CREATE TABLE items (session_id TEXT, item_order INTEGER, envelope BLOB)")
        conn.close()
    else:
        path.write_text("{}\n")
    path.chmod(0o000)
    try:
        rc, out, err = await convlog(tmp_path, "replay", "s", flag, str(path), unprivileged=True)
    finally:
        path.chmod(0o644)
    assert rc == EXIT_USAGE, err
    line = one_line(err)
    assert line.startswith("convlog replay: ") and str(path) in line and words in line, line
    assert out == ""


async def test_a_keyring_mistake_names_the_flag_or_the_variable_given(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    # `convlog log --keyring FILE` with a missing or malformed FILE said "CONVLOG_KEYRING: ...",
    # and --require-signatures without a keyring "CONVLOG_REQUIRE_SIGNATURES needs
    # CONVLOG_KEYRING": variables the user never set.
    (tmp_path / "data").mkdir()
    bad = tmp_path / "keyring.json"
    bad.write_text("{}")
    missing = tmp_path / "nokeyring.json"
    env = cli_env(tmp_path, CONVLOG_NATS_URL=nats_server.url)
    for argv, extra, said, unsaid in [
        (["--keyring", str(missing)], {}, ["--keyring", str(missing)], "CONVLOG_KEYRING"),
        (["--keyring", str(bad)], {}, ["--keyring", str(bad), "malformed"], "CONVLOG_KEYRING"),
        (["--require-signatures"], {}, ["--require-signatures", "keyring"], "CONVLOG_REQUIRE_SIGNATURES"),
        ([], {"CONVLOG_KEYRING": str(missing)}, ["CONVLOG_KEYRING", str(missing)], "--keyring"),
    ]:
        rc, out, err = await convlog(tmp_path, "log", *argv, env={**env, **extra})
        assert rc == EXIT_USAGE, (argv, err)
        (line,) = [x for x in err.splitlines() if x.startswith("convlog log:")]
        assert "Traceback" not in err, err
        assert all(w in line for w in said) and unsaid not in line, (argv, line)
    assert not (tmp_path / "data" / "convlog.db").exists()


# -- help and version ----------------------------------------------------------------


def test_every_command_and_argument_has_a_one_line_description() -> None:
    import argparse

    from services.cli.main import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {c.dest: c.help for c in sub._choices_actions}
    assert set(helps) == set(sub.choices)
    for name, p in sub.choices.items():
        assert helps[name] and "\n" not in helps[name], name
        for action in p._actions:
            assert action.help and action.help != argparse.SUPPRESS, (name, action.dest)
            assert "\n" not in action.help, (name, action.dest)


async def test_help_lists_the_exit_codes_and_version_prints(tmp_path: Path) -> None:
    rc, out, _ = await convlog(tmp_path, "--help")
    assert rc == 0
    codes = out.split("exit codes:", 1)[1]
    for code in ("0", "1", "2", "3", "124"):
        assert re.search(rf"^\s+{code}\s+\w", codes, flags=re.M), (code, codes)
    commands = re.findall(r"^    (\w+)\s{2,}\S", out.split("commands:", 1)[1], flags=re.M)
    assert {"demo", "up", "log", "worker", "send", "tail", "replay", "sessions",
            "bench"} <= set(commands), commands
    helps = await asyncio.gather(*(convlog(tmp_path, c, "--help") for c in commands))
    for c, (rc, text, err) in zip(commands, helps, strict=True):
        assert rc == 0 and f"usage: convlog {c}" in text and "exit codes:" in text, (c, err)
    rc, out, _ = await convlog(tmp_path, "--version")
    from shared import __version__

    assert rc == 0 and out.strip() == f"convlog {__version__}"


# -- against a running log service ---------------------------------------------------


async def _sessions(url: str) -> dict[str, int]:
    client = await LogClient.connect(url)
    try:
        return {s.session_id: s.last_order async for s in client.iter_sessions()}
    finally:
        await client.close()


async def test_send_refuses_before_writing_and_reads_stdin_and_files(
    log_url: str, tmp_path: Path
) -> None:
    env = cli_env(tmp_path, CONVLOG_NATS_URL=log_url)

    # Refused: nothing reaches the append-only log.
    for argv, stdin, words in [
        (["send", "r1", "   "], None, ["empty"]),
        (["send", "r1", "hello", "--to", "Nobody"], None, ["Nobody", "Triage", "nothing was sent"]),
        (["send", "r1", "-"], b"\xff\xfe bad bytes", ["standard input", "UTF-8"]),
        (["send", "r1", "-"], b" \n", ["empty"]),
        (["send", "r1", "--file", str(tmp_path / "missing.txt")], None, ["missing.txt"]),
        (["send", "r1", "hello", "--id", "no spaces allowed"], None, ["--id", "item_id"]),
    ]:
        rc, _, err = await convlog(tmp_path, *argv, env=env, stdin=stdin)
        assert rc == EXIT_USAGE, (argv, err)
        line = one_line(err)
        assert all(w in line for w in words), (words, line)
    assert await _sessions(log_url) == {}

    # Too large for the service: exit 2 (bad input), not 1.
    big = tmp_path / "big.txt"
    big.write_text("x" * (300 * 1024))
    rc, _, err = await convlog(tmp_path, "send", "r2", "--file", str(big), env=env)
    assert rc == EXIT_USAGE and "too_large" in one_line(err), err
    assert await _sessions(log_url) == {}

    # From standard input and from a file (no worker runs, so the turn times out: 124).
    rc, _, err = await convlog(tmp_path, "send", "r3", "-", "--to", "L1Billing", "--timeout",
                               "0.5", env=env, stdin="from stdin, ünïcode\n".encode())
    assert rc == EXIT_TIMEOUT, err
    msg = tmp_path / "msg.txt"
    msg.write_text("line one\nline two\n")
    rc, _, err = await convlog(tmp_path, "send", "r3", "--file", str(msg), "--timeout", "0.5",
                               env=env)
    assert rc == EXIT_TIMEOUT, err
    # `--file -` is standard input too (it looked for a file named "-": exit 2, nothing sent).
    rc, _, err = await convlog(tmp_path, "send", "r3", "--file", "-", "--timeout", "0.5", env=env,
                               stdin=b"piped with --file -\n")
    assert rc == EXIT_TIMEOUT, err
    client = await LogClient.connect(log_url)
    try:
        items = await client.items("r3")
    finally:
        await client.close()
    assert [e.data["content"] for e in items] == ["from stdin, ünïcode", "line one\nline two",
                                                   "piped with --file -"]

    # --id: the same message sent twice with one id (a retry after an unknown outcome)
    # is stored once, and the second send says so.
    for n, said in ((1, "sent #1 to r4\n"), (2, "sent #1 to r4 (already stored: this id was sent before)\n")):
        rc, _, err = await convlog(tmp_path, "send", "r4", "retry me", "--id", "msg-r4.1", "--timeout", "0.5",
                                   env=env)
        assert rc == EXIT_TIMEOUT and err.startswith(said), (n, err)
    client = await LogClient.connect(log_url)
    try:
        items = await client.items("r4")
    finally:
        await client.close()
    assert [(e.item_id, e.data["content"]) for e in items] == [("msg-r4.1", "retry me")]

    # TEXT after the options too (it was "unrecognized arguments"); a second word is still refused.
    rc, _, err = await convlog(tmp_path, "send", "r5", "--to", "L1Billing", "--timeout", "0.5", "after options",
                               env=env)
    assert rc == EXIT_TIMEOUT and err.startswith("sent #1 to r5"), err
    rc, _, err = await convlog(tmp_path, "send", "r6", "--to", "L1Billing", "one", "two", env=env)
    assert rc == EXIT_USAGE and "unrecognized arguments: two" in one_line(err), err
    client = await LogClient.connect(log_url)
    try:
        assert [e.data["content"] for e in await client.items("r5")] == ["after options"]
        assert await client.items("r6") == []
    finally:
        await client.close()


async def test_send_says_so_when_the_log_service_stops_while_it_follows_the_turn(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    # The follower waited out every failure: with the log service gone after the message
    # was stored, `convlog send` sat out its whole --timeout and then blamed the turn
    # ('did not end within 40s (is a worker running ...?)', exit 124), never exit 3.
    import time

    from services.log.service import LogService
    from shared.config import load_settings

    service = LogService(load_settings({"nats_url": nats_server.url, "db": str(tmp_path / "log.db")}, {}))
    await service.start()
    stopped = False
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli.main", "send", "f1", "hello", "--timeout", "40",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=cli_env(tmp_path, CONVLOG_NATS_URL=nats_server.url), cwd=REPO_ROOT,
    )
    try:
        assert proc.stderr is not None
        first = (await asyncio.wait_for(proc.stderr.readline(), 30)).decode()
        assert first == "sent #1 to f1\n", first
        await service.shutdown()
        stopped = True
        started = time.monotonic()
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        took = time.monotonic() - started
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        if not stopped:
            await service.shutdown()
    line = one_line(err.decode())
    assert proc.returncode == EXIT_UNAVAILABLE, (proc.returncode, line)
    assert line.startswith("convlog send: unavailable: ") and "#1" in line and "f1" in line, line
    assert took < 30, took
    assert out == b""


async def test_a_port_that_is_not_nats_is_said_within_the_deadline(tmp_path: Path) -> None:
    # Something that takes connections but is not NATS (another program's port, a typo in
    # CONVLOG_NATS_URL): nats-py's first connect was retried forever, and `convlog web`,
    # `sessions`, `send` ... hung with no word.
    held: list[asyncio.StreamWriter] = []

    async def hold(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # never a word, never closed

    listener = await asyncio.start_server(hold, "127.0.0.1", 0)
    url = f"nats://127.0.0.1:{listener.sockets[0].getsockname()[1]}"
    try:
        for argv in (["web", "--port", "0"], ["sessions"]):
            rc, out, err = await run_cli(*argv, env=cli_env(tmp_path, CONVLOG_NATS_URL=url), timeout=25)
            assert rc == EXIT_UNAVAILABLE, (argv, rc, err)
            line = one_line(err)
            assert url in line and "no NATS server answered within" in line, line
            assert out == ""
    finally:
        listener.close()
        for w in held:
            w.close()


async def test_no_log_service_is_said_at_once(nats_server: NatsServer, tmp_path: Path) -> None:
    env = cli_env(tmp_path, CONVLOG_NATS_URL=nats_server.url)
    for argv in (["sessions"], ["send", "s", "hi"], ["replay", "s"], ["tail", "s", "--count", "1"]):
        rc, _, err = await convlog(tmp_path, *argv, env=env)
        assert rc == EXIT_UNAVAILABLE, (argv, err)
        line = one_line(err)
        # The probe's words, not the retry loop's "no reply ... after N attempts".
        assert "log service is not running" in line and "convlog log" in line, line


async def test_replicated_streams_on_one_server_are_refused_in_one_line(
    nats_server: NatsServer, tmp_path: Path,
) -> None:
    """JetStream refuses R3 on a server that is not clustered: that never heals,
    so the log service says so at once, naming the setting, and creates nothing."""
    env = cli_env(tmp_path, CONVLOG_NATS_URL=nats_server.url, CONVLOG_STREAM_REPLICAS="3")
    (tmp_path / "data").mkdir()
    rc, out, err = await convlog(tmp_path, "log", "--db", str(tmp_path / "data" / "log.db"), env=env)
    assert rc == EXIT_USAGE, err
    assert "Traceback" not in err, err
    (line,) = [x for x in err.splitlines() if x.startswith("convlog log:")]
    assert "cannot set up the streams on NATS JetStream" in line and "non-clustered" in line, line
    assert "CONVLOG_STREAM_REPLICAS" in line, line
    nc = await nats.connect(nats_server.url)
    try:
        assert await nc.jetstream().streams_info() == []
    finally:
        await nc.close()


# -- convlog up next to convlog log; one JetStream directory --------------------------


async def test_up_next_to_a_running_log_service_says_so(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    env = cli_env(tmp_path, CONVLOG_NATS_URL=nats_server.url)
    with python_module("services.cli.main", "log", log_dir=tmp_path, env=env) as log:
        await asyncio.to_thread(log.wait_for_line, r"log service ready", 20)
        # Same data directory: the database is held.
        rc, _, err = await convlog(tmp_path, "up", env=env)
        assert rc == EXIT_FAIL, err
        line = one_line(err)
        assert str(tmp_path / "data" / "convlog.db") in line and "convlog log" in line, line
        # Another data directory, same NATS and prefix: a log service already answers.
        other = cli_env(tmp_path, CONVLOG_NATS_URL=nats_server.url,
                        CONVLOG_DATA_DIR=str(tmp_path / "other"))
        rc, _, err = await convlog(tmp_path, "up", env=other)
        assert rc == EXIT_FAIL, err
        assert "already answers" in one_line(err), err
        assert log.running  # untouched
    assert not (tmp_path / "other" / "supervisor" / "supervisord.conf").exists()


async def test_up_and_log_keep_jetstream_in_the_same_directory(tmp_path: Path) -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    env = cli_env(tmp_path, CONVLOG_NATS_URL=url, CONVLOG_EMBEDDED="true")
    rc, out, err = await convlog(tmp_path, "up", "--print-config", env=env)
    assert rc == 0, err
    store = tmp_path / "data" / "jetstream"  # pytest gives a resolved path
    assert f"-sd {store}" in out, out
    with python_module("services.cli.main", "log", log_dir=tmp_path, env=env) as log:
        await asyncio.to_thread(log.wait_for_line, r"log service ready", 30)
        assert (store / "jetstream").is_dir(), sorted(p.name for p in store.iterdir())
    assert not (tmp_path / "data" / "nats").exists()  # where `convlog log` used to keep it


def test_the_readme_lists_the_exit_codes_the_cli_documents() -> None:
    from services.cli.main import EXIT_CODES

    readme = (REPO_ROOT / "README.md").read_text()
    codes = readme[readme.index("| code | meaning |"):].split("\n\n", 1)[0]  # that table only
    table = dict(re.findall(r"^\| (\d+) \| (.+) \|$", codes, flags=re.M))
    helped = dict(re.findall(r"^\s+(\d+)\s+(\S.*)$", EXIT_CODES, flags=re.M))
    assert set(table) == set(helped), (table, helped)


@pytest.mark.parametrize("argv", [
    ["health", "--agents", "{spec}"],
    ["up", "--agents", "{spec}", "--print-config"],
    ["demo", "--agents", "{spec}"],
    ["worker", "Triage", "--agents", "{spec}"],
    ["keys", "init", "--out", "{keys}", "--agents", "{spec}"],
], ids=["health", "up", "demo", "worker", "keys-init"])
async def test_an_agents_file_that_is_not_utf8_is_one_line_exit_2(argv: list[str], tmp_path: Path) -> None:
    """services/worker/spec.py load_spec catches OSError only: read_text's
    UnicodeDecodeError (a ValueError) reaches main() and prints a traceback, exit 1."""
    spec = tmp_path / "agents.toml"
    spec.write_bytes(b'entry = "caf\xe9"\n')
    args = [a.format(spec=spec, keys=tmp_path / "keys") for a in argv]
    rc, out, err = await convlog(tmp_path, *args, env=cli_env(tmp_path))
    line = one_line(err)
    assert rc == EXIT_USAGE, (rc, err)
    assert str(spec) in line and "UTF-8" in line, line
    assert out == ""  # (`convlog demo` said it on stdout, exit 1)


# `convlog up` gave CONVLOG_SIGNING_KEY to the log service and to every worker: one key
# cannot be the log's and each agent's, so a signed stack could not run under `up` at all
# (its workers' appends refused, or the log service refused its own key).  `--keys DIR`
# gives each program its own key of a `convlog keys init` directory; one shared key is
# refused in one line.
async def test_up_signs_with_each_programs_own_key_and_refuses_one_key_for_all(tmp_path: Path) -> None:
    import configparser

    from services.cli.common import packaged_agents_path
    from services.worker.spec import load_spec

    agents = list(load_spec(packaged_agents_path()).agents)
    keys = tmp_path / "keys"
    rc, _, err = await convlog(tmp_path, "keys", "init", "--agents", str(packaged_agents_path()),
                               "--out", str(keys), env=cli_env(tmp_path))
    assert rc == 0, err
    up_env = cli_env(tmp_path, CONVLOG_NATS_URL=f"nats://127.0.0.1:{free_port()}", CONVLOG_EMBEDDED="true")
    rc, out, err = await convlog(tmp_path, "up", "--keys", str(keys), "--print-config", env=up_env)
    assert rc == 0, err
    conf = configparser.RawConfigParser()
    conf.read_string(out)
    want = {"log": "log.nk", **{f"worker-{a}": f"{a}.nk" for a in agents}}
    for program, key in want.items():
        env = conf.get(f"program:{program}", "environment")
        assert f'CONVLOG_SIGNING_KEY="{keys / key}"' in env, (program, env)
        assert f'CONVLOG_KEYRING="{keys / "keyring.json"}"' in env and 'CONVLOG_REQUIRE_SIGNATURES="true"' in env
        assert "CONVLOG_NKEY" not in env  # its own nats-server has no users
    assert "CONVLOG_SIGNING_KEY" not in conf.get("supervisord", "environment")
    # Each program logs in with its own key (against a server it does not start): one
    # login for all of them is refused in one line.
    rc, out, err = await convlog(tmp_path, "up", "--keys", str(keys), "--print-config",
                                 env={**up_env, "CONVLOG_NKEY": str(keys / "gateway.nk")})
    assert rc == 2 and "CONVLOG_NKEY" in one_line(err) and "--keys" in err and out == "", (rc, err)
    for name, value in (("CONVLOG_USER", "someone"), ("CONVLOG_TOKEN", "s3cret")):  # (a creds file, too)
        rc, out, err = await convlog(tmp_path, "up", "--keys", str(keys), "--print-config",
                                     env={**up_env, name: value})
        assert rc == 2 and name in one_line(err) and "--keys" in err and out == "", (name, rc, err)

    rc, _, err = await convlog(tmp_path, "up", "--print-config",
                               env={**up_env, "CONVLOG_SIGNING_KEY": str(keys / "log.nk")})
    assert rc == 2 and "CONVLOG_SIGNING_KEY" in one_line(err) and "--keys DIR" in err, (rc, err)
    (keys / f"{agents[-1]}.nk").unlink()
    rc, _, err = await convlog(tmp_path, "up", "--keys", str(keys), "--print-config", env=up_env)
    assert rc == 2 and f"{agents[-1]}.nk" in one_line(err), (rc, err)


# `convlog up --keys DIR` checked only that DIR's files hold keys, not that the keyring
# gives them to their programs: a DIR whose keyring.json came from another `keys init`
# (or a key file copied from another) started a stack whose log service refused its own
# key at every start, and whose workers' appends the log refused.  Said in one line.
async def test_up_refuses_a_keys_dir_whose_keyring_does_not_hold_its_keys(tmp_path: Path) -> None:
    import shutil

    from services.cli.common import packaged_agents_path
    from services.worker.spec import load_spec

    agents = list(load_spec(packaged_agents_path()).agents)
    for name in ("keys", "other"):
        rc, _, err = await convlog(tmp_path, "keys", "init", "--agents", str(packaged_agents_path()),
                                   "--out", str(tmp_path / name), env=cli_env(tmp_path))
        assert rc == 0, err
    keys, other = tmp_path / "keys", tmp_path / "other"
    up_env = cli_env(tmp_path, CONVLOG_NATS_URL=f"nats://127.0.0.1:{free_port()}", CONVLOG_EMBEDDED="true")
    (keys / "keyring.json").rename(tmp_path / "keyring.json")
    shutil.copy(other / "keyring.json", keys / "keyring.json")
    rc, out, err = await convlog(tmp_path, "up", "--keys", str(keys), "--print-config", env=up_env)
    assert rc == 2 and "log.nk" in one_line(err) and "live log service key" in err, (rc, err)
    assert out == ""

    (keys / "keyring.json").unlink()
    (tmp_path / "keyring.json").rename(keys / "keyring.json")
    (keys / f"{agents[0]}.nk").unlink()  # another agent's key under this agent's name
    shutil.copy(keys / f"{agents[1]}.nk", keys / f"{agents[0]}.nk")
    rc, _, err = await convlog(tmp_path, "up", "--keys", str(keys), "--print-config", env=up_env)
    assert rc == 2 and f"{agents[0]}.nk" in one_line(err) and f"not {agents[0]!r}" in err, (rc, err)

    rc, _, err = await convlog(tmp_path, "up", "--keys", str(other), "--print-config", env=up_env)
    assert rc == 0, err


async def test_up_at_a_port_that_is_not_nats_says_so_and_starts_nothing(tmp_path: Path) -> None:
    # Something that takes connections at the NATS URL but is not NATS (another program's
    # port): `convlog up` said 'NATS: ... (already running)' and started a log service and
    # workers that waited 60 s for JetStream there, exited, and were restarted, forever.
    held: list[asyncio.StreamWriter] = []

    async def hold(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # never a word, never closed

    listener = await asyncio.start_server(hold, "127.0.0.1", 0)
    url = f"nats://127.0.0.1:{listener.sockets[0].getsockname()[1]}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli.main", "up", env=cli_env(tmp_path, CONVLOG_NATS_URL=url,
                                                                      CONVLOG_EMBEDDED="true"),
        cwd=REPO_ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        try:
            _, err = await asyncio.wait_for(proc.communicate(), 10)
        except TimeoutError:
            proc.terminate()  # our own child, by its PID: it stops the stack it started
            _, err = await asyncio.wait_for(proc.communicate(), 40)
            raise AssertionError(f"convlog up ran on at a port that is not NATS: {err.decode()}") from None
        assert proc.returncode == EXIT_UNAVAILABLE, err.decode()
        line = one_line(err.decode())
        assert url in line and "not a NATS server" in line, line
        assert not (tmp_path / "data" / "supervisor" / "supervisord.conf").exists()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        listener.close()
        for w in held:
            w.close()
