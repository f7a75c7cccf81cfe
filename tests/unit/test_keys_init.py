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
