"""``convlog keys init|rotate``: make the Ed25519 keys of a deployment.

``init`` writes one private key (an nkey seed, mode 0600) per agent of the
spec, one for the log service (``log.nk``) and one for the user gateway
(``gateway.nk``), and one public keyring (``keyring.json``) that the log
service and auditors read (``CONVLOG_KEYRING``).  A worker or client points
``CONVLOG_SIGNING_KEY`` at its own ``.nk`` file.  ``rotate`` adds a new key for
one agent (or ``log``/``gateway``) and marks the old one retired: what it
signed before still verifies, nothing it signs afterwards is accepted.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import shlex
import stat
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from shared.config import Settings
from shared.signing import (
    GATEWAY,
    LOG,
    LOG_AGENT,
    SYSTEM_AGENT,
    USER_AGENT,
    KeyEntry,
    Keyring,
    KeyringError,
    Signer,
    write_private,
)
from shared.subjects import Subjects

from .nats_users import render_users

if TYPE_CHECKING:
    from services.worker.spec import SystemSpec

__all__ = ["cmd_keys", "keys_arguments", "make_keys"]

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2

#: Seconds after ``keys rotate`` at which the old key is retired: running processes read
#: the keyring and key files again within a second or two, and until then the log service
#: still takes the old key; what it took before must verify (retired_at is compared with
#: each item's created_at and each head's signed_at).
RETIRE_AFTER = 5.0


def _now(after: float = 0.0) -> str:
    return (datetime.now(UTC) + timedelta(seconds=after)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def keys_arguments(p: argparse.ArgumentParser) -> None:
    ks = p.add_subparsers(dest="keys_command", required=True, metavar="ACTION",
                          help="init: make the keys and the keyring; rotate: a new key for one")
    i = ks.add_parser("init", help="one key per agent, the log service and the gateway; a keyring")
    i.add_argument("--agents", help="agents TOML [CONVLOG_AGENTS, default: the packaged spec]")
    i.add_argument("--out", required=True, help="directory for the key files and keyring.json")
    r = ks.add_parser("rotate", help="add a new key for AGENT (or log, gateway); retire the old")
    r.add_argument("agent", metavar="AGENT")
    r.add_argument("--dir", required=True, help="the directory `keys init` wrote")
    r.add_argument("--agents", help="agents TOML, for its entry agent in nats-users.conf "
                                    "[CONVLOG_AGENTS, default: the packaged spec]")


async def cmd_keys(args: argparse.Namespace, settings: Settings) -> int:
    try:
        if args.keys_command == "init":
            return _init(Path(args.out), Path(args.agents) if args.agents else settings.agents,
                         settings.subjects)
        return _rotate(Path(args.dir), args.agent, Path(args.agents) if args.agents else settings.agents,
                       settings.subjects)
    except KeyringError as e:
        print(f"convlog keys: {e}", file=sys.stderr)
        return EXIT_USAGE


def _shell(path: Path) -> str:
    return shlex.quote(str(path))


def _replace(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all: a temporary file beside it, synced, renamed over it
    (with ``path``'s owner and mode: :func:`_take_over`)."""
    tmp = path.with_name(f"{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    _take_over(tmp, path)
    tmp.replace(path)


def _take_over(new: Path, old: Path, *, private: bool = False) -> None:
    """Give ``new`` the owner, group and mode of ``old`` (if there), which it is about to
    replace.  It had the rotating user's owner and umask: rotated by root (umask 077), a
    keyring or key file that the log service, a worker or nats-server reads as its own user
    became unreadable to it (the new key unknown to it, or its seed out of its reach: once
    the old key retired, each of its appends refused).  ``private``: a seed, which others
    never get to read; one whose owner cannot be given to it stays its owner's alone."""
    try:
        st = os.stat(old)
    except FileNotFoundError:
        return
    mode = stat.S_IMODE(st.st_mode) & (0o770 if private else 0o777)
    if (st.st_uid, st.st_gid) != (os.getuid(), os.getgid()):
        try:
            os.chown(new, st.st_uid, st.st_gid)
        except PermissionError:  # not root: ours, as a file we write is
            mode &= 0o700 if private else 0o777
    os.chmod(new, mode or 0o600)


def _keep_retired(key_path: Path) -> None:
    """A second name for the seed in ``key_path``, ``<name>.<key id>.retired.nk``, before
    the new seed takes its place (one there already holding it, from a failed run, is kept)."""
    seed = key_path.read_bytes()
    old_id = Signer(seed).key_id
    for label in (old_id[:8], old_id):  # the long name only if the short one holds another seed
        retired = key_path.with_name(f"{key_path.stem}.{label}.retired.nk")
        if not retired.exists():
            os.link(key_path, retired)
            return
        if retired.read_bytes() == seed:
            return
    raise FileExistsError(errno.EEXIST, "a retired key file of that name holds another seed", str(retired))


def _key_file(out: Path, role: str, agent: str) -> Path:
    return out / (f"{role}.nk" if role in (LOG, GATEWAY) else f"{agent}.nk")


def make_keys(out: Path, agents: Sequence[str], *, entry: str | None = None,
              subjects: Subjects | None = None) -> Keyring:
    """Write ``<Agent>.nk`` per agent, ``log.nk``, ``gateway.nk``, ``keyring.json``
    and ``nats-users.conf`` in ``out``; ``entry`` is the spec's entry agent (by
    default the first of ``agents``), whose NATS user may give its consumer two filters;
    ``subjects``: the deployment's prefix (``CONVLOG_PREFIX``; by default ``convlog``).

    Raises:
        FileExistsError: a key, keyring or users file is already there (nothing is written).
        KeyringError: an agent is named as a role or its author (nothing is written).
    """
    for a in agents:  # their key file, or what their key could sign, would be a role's
        if a in (LOG, GATEWAY, LOG_AGENT, USER_AGENT, SYSTEM_AGENT):
            raise KeyringError(f"agent name {a!r} is taken by the log service, the gateway or "
                               "its authors (log.nk, gateway.nk; user, system): rename the agent")
    wanted = [("agent", a) for a in agents] + [(LOG, LOG_AGENT), (GATEWAY, USER_AGENT)]
    if out.exists() and not out.is_dir():  # mkdir says "exists", as if it held keys
        raise NotADirectoryError(20, "not a directory", str(out))
    out.mkdir(parents=True, exist_ok=True)
    ring_path = out / "keyring.json"
    for p in [ring_path, out / "nats-users.conf", *(_key_file(out, r, a) for r, a in wanted)]:
        if p.exists():
            raise FileExistsError(17, "exists", str(p))
    if entry is None and agents:
        entry = agents[0]
    # A failure part-way (a full disk) left the key files written so far and a cut
    # keyring.json: a rerun refused them ("exists ... use `convlog keys rotate`"), which
    # cannot rotate without a whole keyring.  What this run made is removed again.
    made: list[Path] = []
    try:
        entries = []
        for role, agent in wanted:
            signer, seed = Signer.generate()
            _create(_key_file(out, role, agent), seed + b"\n", 0o600, made)
            entries.append(KeyEntry(key_id=signer.key_id, role=role, agent=agent, created_at=_now()))
        ring = Keyring(entries)
        _create(ring_path, ring.dumps(), 0o666, made)
        _create(out / "nats-users.conf", render_users(ring, subjects, entry=entry).encode(), 0o666, made)
    except BaseException:
        for p in reversed(made):
            with contextlib.suppress(OSError):
                p.unlink()
        raise
    return ring


def _create(path: Path, data: bytes, mode: int, made: list[Path]) -> None:
    """Write a new file ``path`` (never one there already), noted in ``made`` once it is
    ours; an error names it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    made.append(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except OSError as e:
        e.filename = e.filename or str(path)
        raise


def _spec(agents_path: Path | None) -> SystemSpec | None:
    """The agents spec (``None``, after one line on stderr, when it cannot be read)."""
    from services.worker.spec import SpecError, load_spec

    from .common import packaged_agents_path

    try:
        return load_spec(agents_path or packaged_agents_path())
    except SpecError as e:
        print(f"convlog keys: {e}", file=sys.stderr)
        return None


def _init(out: Path, agents_path: Path | None, subjects: Subjects) -> int:
    spec = _spec(agents_path)
    if spec is None:
        return EXIT_USAGE
    try:
        entries = make_keys(out, list(spec.agents), entry=spec.entry, subjects=subjects)
    except FileExistsError as e:
        if (out / "keyring.json").exists():
            print(f"convlog keys: {e.filename} exists; refusing to overwrite keys "
                  "(use `convlog keys rotate`, or another --out)", file=sys.stderr)
        else:  # no keyring to rotate with: what a `keys init` killed part-way leaves
            ours = [out / "nats-users.conf", *(_key_file(out, "agent", a) for a in spec.agents),
                    _key_file(out, LOG, LOG_AGENT), _key_file(out, GATEWAY, USER_AGENT)]
            there = " ".join(_shell(p) for p in ours if os.path.lexists(p))
            print(f"convlog keys: {e.filename} exists but {out / 'keyring.json'} does not, so "
                  "`convlog keys rotate` cannot use it; refusing to overwrite keys (if a `keys init` "
                  f"stopped part-way, delete what it left: rm {there}; or use another --out)", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:  # a path that cannot be a folder of keys: bad input, as --out named it
        print(f"convlog keys: --out {out}: {e.strerror or e}"
              f"{f' ({e.filename})' if e.filename and str(e.filename) != str(out) else ''}; "
              "no file written", file=sys.stderr)
        return EXIT_USAGE
    ring_path = out / "keyring.json"
    print(f"wrote {len(entries.entries)} private keys (mode 0600) and {ring_path} to {out}")
    q = _shell  # the lines are meant to be pasted into a shell: a path with a space stays one word
    print(f"  log service: CONVLOG_KEYRING={q(ring_path)} CONVLOG_SIGNING_KEY={q(out / 'log.nk')}")
    print(f"  worker AGENT: CONVLOG_SIGNING_KEY={q(out)}/AGENT.nk; user gateway: {q(out / 'gateway.nk')}")
    # nats-server reads an include's path relative to the config file, even one starting
    # with "/" (it printed `include /abs/path`, which no server config could take), and a
    # path with a space only quoted.
    print(f"  NATS: put {q(out / 'nats-users.conf')} beside the server config and add the line "
          "`include \"nats-users.conf\"` to it (nats-server takes an include's path relative to "
          "the config, even one starting with /); each process logs in with its own key file as "
          "CONVLOG_NKEY")
    return EXIT_OK


def _rotate(folder: Path, agent: str, agents_path: Path | None, subjects: Subjects) -> int:
    ring_path = folder / "keyring.json"
    ring = Keyring.load(ring_path)
    spec = _spec(agents_path)  # its entry agent, for nats-users.conf
    if spec is None:
        return EXIT_USAGE
    if agents_path is None:  # the packaged reference spec: is it the one these keys were made for?
        strangers = sorted({e.agent for e in ring.entries if e.role == "agent" and e.retired_at is None}
                           - set(spec.agents))
        if strangers:  # nats-users.conf would give the reference spec's entry agent its rights
            print(f"convlog keys: {ring_path} has keys for agents the packaged reference spec does "
                  f"not have ({', '.join(strangers)}): give your agents file with --agents (or "
                  "CONVLOG_AGENTS), whose entry agent nats-users.conf names", file=sys.stderr)
            return EXIT_USAGE
    role = agent if agent in (LOG, GATEWAY) else "agent"
    name = {LOG: LOG_AGENT, GATEWAY: USER_AGENT}.get(agent, agent)
    live = [e for e in ring.of_role(role, name) if e.retired_at is None]
    # No live key: an agent added to the spec since `keys init`, or one whose keys were
    # all retired (by hand, say a leaked one): it gets its key, nothing is retired.
    if not live and role == "agent" and (name not in spec.agents or name in (USER_AGENT, SYSTEM_AGENT, LOG_AGENT)):
        print(f"convlog keys: {ring_path} has no live key for {agent!r}, and {agent!r} is not "
              "an agent of the agents spec that may have one", file=sys.stderr)
        return EXIT_USAGE
    now, retired_at = _now(), _now(RETIRE_AFTER)
    key_path = _key_file(folder, role, name)
    signer, seed = Signer.generate()
    added = Keyring([*ring.entries, KeyEntry(key_id=signer.key_id, role=role, agent=name, created_at=now)])
    final = Keyring([msgspec.structs.replace(e, retired_at=retired_at) if e in live else e for e in added.entries])
    # Add, switch, retire: after each step the keyring and the NATS users accept whatever
    # key the key file holds, so a failure part-way (a full disk) refuses no process, and
    # running the command again completes the rotation (retiring any key a failed run added).
    # A file that is a symbolic link (keyring.json -> /etc/convlog/keyring.json, say) is
    # written through: the new file goes beside its target and replaces that, so whoever
    # reads the target sees the rotation (renamed over the link, the link became a plain
    # file and the target kept the old keyring and seed).
    ring_file, users, key_file = (Path(os.path.realpath(p)) for p in (ring_path, folder / "nats-users.conf", key_path))
    fresh = key_file.with_name(f"{key_file.name}.new")
    try:
        fresh.unlink(missing_ok=True)  # a failed run's, never in force: its key (if named) is retired here
        write_private(fresh, seed)
        _take_over(fresh, key_file, private=True)  # its reader keeps reading it
        _replace(ring_file, added.dumps())
        _replace(users, render_users(added, subjects, entry=spec.entry).encode())
        if key_file.exists():  # keep the old seed aside; delete it once nothing needs it
            _keep_retired(key_file)
        os.replace(fresh, key_file)  # running processes take the new key from here on
        _replace(ring_file, final.dumps())
        _replace(users, render_users(final, subjects, entry=spec.entry).encode())
    except OSError as e:
        print(f"convlog keys: rotating {agent} failed: {e.strerror or e}"
              f"{f' ({e.filename})' if e.filename else ''}; the key in {key_path} and the keyring "
              "still accept each other: run the command again to finish the rotation", file=sys.stderr)
        return EXIT_FAIL
    if not live:
        print(f"added a key for {agent}: {signer.key_id[:12]}... in {key_path} (no live key retired)")
        return EXIT_OK
    print(f"rotated {agent}: new key {signer.key_id[:12]}... in {key_path}; "
          f"{len(live)} old key(s) retired at {retired_at}, in {RETIRE_AFTER:g}s (what they signed "
          "before still verifies; running processes take the new key meanwhile)")
    return EXIT_OK
