"""Credentials settings that cannot work are refused before connecting, naming
the setting; the nkeys package they need is installed (nats-py's extra)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from shared.config import ConfigError, Settings
from shared.nats_connect import check_credentials


def test_nkeys_is_installed_with_convlog() -> None:
    import nkeys

    assert callable(nkeys.from_seed)


def test_a_missing_nkeys_package_names_the_install_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "nkeys", None)  # import nkeys -> ImportError
    with pytest.raises(ConfigError, match=r"pip install 'nats-py\[nkeys\]'"):
        check_credentials(Settings(nkey="SUAEXAMPLE"))


def test_unreadable_or_foreign_creds_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"CONVLOG_CREDS=.*missing.creds: cannot read it: No such file"):
        check_credentials(Settings(creds=str(tmp_path / "missing.creds")))
    with pytest.raises(ConfigError, match="cannot read it"):
        check_credentials(Settings(creds=str(tmp_path)))  # a directory
    notes = tmp_path / "notes.txt"
    notes.write_text("user: alice\npassword: hunter2\n")
    with pytest.raises(ConfigError, match=r"notes.txt is not a NATS credentials file"):
        check_credentials(Settings(creds=str(notes)))
    check_credentials(Settings())  # no credentials: nothing to check
