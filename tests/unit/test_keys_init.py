"""``convlog keys init`` in a folder that already holds some of what it writes:
refused naming the file, and nothing in the folder is written or changed."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.cli.main import main


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_keys_init_refuses_a_folder_whose_nats_users_conf_exists(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # nats-users.conf (the users a nats-server includes, maybe edited by hand or
    # another deployment's) was overwritten without a word, exit 0, while any
    # key file or keyring.json already there is refused.
    monkeypatch.delenv("CONVLOG_AGENTS", raising=False)
    out = tmp_path / "keys"
    out.mkdir()
    (out / "nats-users.conf").write_text("# our own users, edited by hand\n")
    before = _snapshot(out)
    assert main(["keys", "init", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "nats-users.conf exists" in err and len(err.strip().splitlines()) == 1, err
    assert _snapshot(out) == before  # no key written, the file untouched


def test_keys_init_into_a_file_says_it_is_not_a_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # --out naming a regular file said "FILE exists; refusing to overwrite keys (use
    # `convlog keys rotate`, or another --out)": as if it were a folder of keys.
    monkeypatch.delenv("CONVLOG_AGENTS", raising=False)
    notes = tmp_path / "notes.txt"
    notes.write_text("hello\n")
    assert main(["keys", "init", "--out", str(notes)]) == 2
    err = capsys.readouterr().err
    assert f"--out {notes}: " in err and "not a directory" in err.lower(), err
    assert "rotate" not in err and len(err.strip().splitlines()) == 1, err
    assert notes.read_text() == "hello\n"


# `keys init` makes the files a deployment's CONVLOG_KEYRING and CONVLOG_SIGNING_KEY then
# name; with those already set (an env file read before the keys exist), the start-up
# check that they exist refused the very command that makes them.
def test_keys_init_runs_with_the_variables_naming_the_keys_it_makes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "keys"
    monkeypatch.setenv("CONVLOG_KEYRING", str(out / "keyring.json"))
    monkeypatch.setenv("CONVLOG_SIGNING_KEY", str(out / "agents" / "Triage.nk"))
    assert main(["keys", "init", "--out", str(out)]) == 0
    assert (out / "keyring.json").is_file()
    assert main(["keys", "rotate", "Triage", "--dir", str(out)]) == 0


def _accepts(out: Path, key_file: Path, agent: str) -> bool:
    from shared.signing import Keyring, Signer

    key_id = Signer.load(key_file).key_id
    return Keyring.load(out / "keyring.json").refusal(key_id, agent, via_inbound=False) is None \
        and key_id in (out / "nats-users.conf").read_text()


def test_a_rotation_that_fails_part_way_leaves_the_key_in_force_accepted_and_a_rerun_finishes_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The new seed replaced the key file before the keyring was written: a failure in
    # between (a full disk; here the keyring's temporary file cannot be made) left a key
    # file whose key the keyring did not know -- every running Triage worker took it and
    # was refused -- and a traceback.  Now the key in force stays accepted, the command
    # says to run it again, and the rerun finishes the rotation.
    from shared.signing import Keyring, Signer

    monkeypatch.delenv("CONVLOG_AGENTS", raising=False)
    out = tmp_path / "keys"
    assert main(["keys", "init", "--out", str(out)]) == 0
    key_file = out / "Triage.nk"
    old_seed, old_id = key_file.read_bytes(), Signer.load(key_file).key_id
    capsys.readouterr()
    blocker = out / "keyring.json.tmp"
    blocker.mkdir()
    assert main(["keys", "rotate", "Triage", "--dir", str(out)]) == 1
    err = capsys.readouterr().err
    assert "run the command again" in err and "Traceback" not in err, err
    assert key_file.read_bytes() == old_seed and _accepts(out, key_file, "Triage")

    blocker.rmdir()
    assert main(["keys", "rotate", "Triage", "--dir", str(out)]) == 0
    new_id = Signer.load(key_file).key_id
    assert new_id != old_id and _accepts(out, key_file, "Triage")
    ring = Keyring.load(out / "keyring.json")
    triage = [e for e in ring.of_role("agent", "Triage")]
    assert [e.key_id for e in triage if e.retired_at is None] == [new_id]
    assert (out / f"Triage.{old_id[:8]}.retired.nk").read_bytes() == old_seed
    assert not list(out.glob("*.new")) and not list(out.glob("*.tmp"))


def _init_line(
    out: Path, marker: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> tuple[Path, str]:
    """``convlog keys init --out OUT`` (the packaged spec); the line of its output with ``marker``."""
    monkeypatch.delenv("CONVLOG_AGENTS", raising=False)
    capsys.readouterr()
    assert main(["keys", "init", "--out", str(out)]) == 0
    return out, next(x for x in capsys.readouterr().out.splitlines() if marker in x)


def test_the_variables_keys_init_prints_paste_into_a_shell_with_a_space_in_the_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # "CONVLOG_KEYRING=/x/my keys/keyring.json" split at the space when pasted.
    import shlex

    out, line = _init_line(tmp_path / "my keys", "log service:", capsys, monkeypatch)
    words = shlex.split(line.split("log service:", 1)[1])
    assert dict(w.split("=", 1) for w in words) == {
        "CONVLOG_KEYRING": str(out / "keyring.json"), "CONVLOG_SIGNING_KEY": str(out / "log.nk")}


def test_a_rotation_keeps_the_owner_and_mode_of_the_files_it_replaces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each file a rotation writes was made new, with the rotating user's owner and umask:
    # `keys rotate` run by root (umask 077) left keyring.json and nats-users.conf 0600 and
    # the agent's new key file root's, so the log service, nats-server and the worker, each
    # reading as its own user, could no longer read them (the new key unknown to the log
    # service, its seed out of the worker's reach: once the old key retired 5 s later, each
    # of the worker's appends was refused). They keep the owner, group and mode they had;
    # a seed never gets bits for others.
    import os
    import stat
    import subprocess
    import sys

    monkeypatch.delenv("CONVLOG_AGENTS", raising=False)
    out = tmp_path / "keys"
    assert main(["keys", "init", "--out", str(out)]) == 0
    root = os.getuid() == 0
    owner = (65534, 65534) if root else (os.getuid(), os.getgid())  # the reader's user, as deployed
    modes = {"keyring.json": 0o644, "nats-users.conf": 0o640, "Triage.nk": 0o640, "log.nk": 0o604}
    for name, mode in modes.items():
        (out / name).chmod(mode)
        if root:
            os.chown(out / name, *owner)
    for agent in ("Triage", "log"):
        done = subprocess.run([sys.executable, "-m", "services.cli.main", "keys", "rotate", agent, "--dir", str(out)],
                              umask=0o077, capture_output=True, text=True, timeout=30, check=False)
        assert done.returncode == 0, done.stderr
    modes["log.nk"] = 0o600  # others lose their bits on a seed
    for name, mode in modes.items():
        st = (out / name).stat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (mode, *owner), name


def test_the_nats_include_keys_init_prints_is_one_a_server_config_takes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # It printed "include /abs/my keys/nats-users.conf": nats-server reads an include's path
    # relative to the config file even when it starts with "/", and splits it at the space.
    import re
    import shlex
    import shutil
    import subprocess

    from tests.support.natsd import nats_server_binary

    out, line = _init_line(tmp_path / "my keys", "NATS:", capsys, monkeypatch)
    found = re.search(r"`(include [^`]+)`|(include .+?) in the server config", line)
    assert found, line
    include = found.group(1) or found.group(2)
    put = re.search(r"put (.+?) beside", line)
    assert put is None or shlex.split(put.group(1)) == [str(out / "nats-users.conf")], line
    conf_dir = tmp_path / "nats conf"
    conf_dir.mkdir()
    shutil.copy(out / "nats-users.conf", conf_dir)
    conf = conf_dir / "server.conf"
    conf.write_text(f"port: -1\n{include}\n")
    res = subprocess.run([nats_server_binary(), "-t", "-c", str(conf)], capture_output=True, text=True, timeout=20)
    assert res.returncode == 0, res.stdout + res.stderr



def test_a_keyring_agent_name_outside_the_spec_pattern_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # An agent's name in the keyring went unescaped into nats-users.conf: `keys rotate`
    # wrote "...convlog-agent-L1Billing", ">"] } }" (publish rights to every subject) or
    # "$JS.API.CONSUMER.MSG.NEXT.CONVLOG_WORK.convlog-agent-x.>" (a wildcard) for a keyring
    # naming such an agent, exit 0.  It is refused wherever the keyring is read.
    import json

    from services.cli.common import packaged_agents_path
    from shared.signing import Keyring, KeyringError

    monkeypatch.delenv("CONVLOG_AGENTS", raising=False)
    out = tmp_path / "keys"
    assert main(["keys", "init", "--out", str(out)]) == 0
    good = (out / "keyring.json").read_text()
    agents = str(packaged_agents_path())  # given: the packaged spec's check of strangers is skipped
    for name in ["x.>", "x.*", "a>", 'L1Billing", ">"] } }\n    # ', "a b", ""]:
        doc = json.loads(good)
        bad = next(e for e in doc["keys"] if e["agent"] == "L1Billing")
        bad["agent"] = name
        (out / "keyring.json").write_text(json.dumps(doc))
        before = _snapshot(out)
        with pytest.raises(KeyringError, match=bad["key_id"]):
            Keyring.load(out / "keyring.json")
        capsys.readouterr()
        assert main(["keys", "rotate", "Triage", "--dir", str(out), "--agents", agents]) == 2, name
        err = capsys.readouterr().err
        assert bad["key_id"] in err and "letters, digits" in err and len(err.strip().splitlines()) == 1, err
        assert _snapshot(out) == before, name


def test_a_rotation_writes_through_symbolic_links_to_the_files_they_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # keyring.json, nats-users.conf and the key file as links to files kept elsewhere (one
    # copy that the log service, nats-server and the worker read): `keys rotate` renamed
    # its new files over the links, so the links became plain files and the files they
    # named kept the old keyring and seed -- every reader of those missed the rotation (and
    # the old key, retired 5 s later, was refused).  It now writes through to the targets.
    from shared.signing import Keyring, Signer

    monkeypatch.delenv("CONVLOG_AGENTS", raising=False)
    real, links = tmp_path / "real", tmp_path / "links"
    assert main(["keys", "init", "--out", str(real)]) == 0
    links.mkdir()
    names = ("keyring.json", "nats-users.conf", "Triage.nk")
    for name in names:
        (links / name).symlink_to(real / name)
    old_seed, old_id = (real / "Triage.nk").read_bytes(), Signer.load(real / "Triage.nk").key_id
    assert main(["keys", "rotate", "Triage", "--dir", str(links)]) == 0
    assert all((links / n).is_symlink() and (links / n).resolve() == real / n for n in names)
    new_id = Signer.load(real / "Triage.nk").key_id
    assert new_id != old_id and _accepts(real, real / "Triage.nk", "Triage")
    ring = Keyring.load(real / "keyring.json")
    assert [e.key_id for e in ring.of_role("agent", "Triage") if e.retired_at is None] == [new_id]
    # the old seed kept beside the file it was in, not as a link to the (now new) key file
    retired = real / f"Triage.{old_id[:8]}.retired.nk"
    assert not retired.is_symlink() and retired.read_bytes() == old_seed
    assert not list(links.glob("Triage.*.retired.nk"))
    assert not [p for p in (*real.iterdir(), *links.iterdir()) if p.suffix in (".new", ".tmp")]


def test_keys_init_that_fails_part_way_leaves_nothing_and_a_rerun_makes_the_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A failure part-way (a full disk: here a file size limit, which a write past it
    # meets as EFBIG) left every key file and a cut keyring.json: a rerun said
    # "keyring.json exists; ... use `convlog keys rotate`", and rotate could not read the
    # keyring. What the failed run made is removed; a rerun makes the keys.
    import resource
    import subprocess
    import sys

    monkeypatch.delenv("CONVLOG_AGENTS", raising=False)
    out = tmp_path / "keys"

    def small_files() -> None:  # keyring.json is ~1.4 kB, a key file 59 bytes
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))

    done = subprocess.run([sys.executable, "-m", "services.cli.main", "keys", "init", "--out", str(out)],
                          preexec_fn=small_files, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 2 and "keyring.json" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert list(out.iterdir()) == []
    assert main(["keys", "init", "--out", str(out)]) == 0
    assert main(["keys", "rotate", "Triage", "--dir", str(out)]) == 0

    # Killed part-way (nothing removed then): the refusal says what to delete.
    left = tmp_path / "left"
    left.mkdir()
    (left / "Triage.nk").write_bytes((out / "Triage.nk").read_bytes())
    capsys.readouterr()
    assert main(["keys", "init", "--out", str(left)]) == 2
    err = capsys.readouterr().err
    assert f"rm {left / 'Triage.nk'};" in err and "rotate` cannot" in err, err


def test_a_keyring_entry_whose_created_at_is_no_time_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A hand-edited keyring's created_at "t" (or "yesterday") was taken, while a retired_at
    # so written is refused: `keys rotate` carried it on, exit 0.  It is refused alike.
    import json

    monkeypatch.delenv("CONVLOG_AGENTS", raising=False)
    out = tmp_path / "keys"
    assert main(["keys", "init", "--out", str(out)]) == 0
    doc = json.loads((out / "keyring.json").read_text())
    doc["keys"][0]["created_at"] = "t"
    (out / "keyring.json").write_text(json.dumps(doc))
    before = _snapshot(out)
    capsys.readouterr()
    assert main(["keys", "rotate", "Triage", "--dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{doc['keys'][0]['key_id']}: created_at 't' is not an RFC 3339 time" in err, err
    assert _snapshot(out) == before
