"""Settings: flags > CONVLOG_* variables > defaults, each value parsed by its type."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from shared.config import ConfigError, Settings, load_settings, nats_servers


def test_precedence_flags_then_environment_then_defaults(tmp_path: Path) -> None:
    env = {"CONVLOG_PREFIX": "envp", "CONVLOG_COMMIT_BATCH": " 64 ", "CONVLOG_DATA_DIR": str(tmp_path)}
    s = load_settings({"prefix": "flagp", "log_level": None}, env)
    assert s.prefix == "flagp"  # the flag wins
    assert s.commit_batch == 64  # the variable, parsed as an int
    assert s.log_level == "INFO" and s.grace == 10.0  # defaults
    assert s.data_dir == tmp_path
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.prefix = "x"  # type: ignore[misc]


@pytest.mark.parametrize(("name", "raw", "value"), [
    ("embedded", "no", False), ("embedded", "ON", True), ("embedded", "0", False),
    ("request_timeout", "2.5", 2.5), ("grace", "0", 0.0), ("stream_replicas", "3", 3),
    ("log_level", "warning", "WARNING"), ("db", "~/x.db", Path("~/x.db").expanduser()),
    ("nats_url", "tls://a:4443,nats://b", "tls://a:4443,nats://b"),
])
def test_each_value_is_parsed_by_its_type(name: str, raw: str, value: object) -> None:
    assert getattr(load_settings(environ={f"CONVLOG_{name.upper()}": raw}), name) == value


@pytest.mark.parametrize(("name", "raw"), [
    ("commit_batch", "0"), ("commit_batch", "1.5"), ("stream_replicas", "6"),
    ("request_timeout", "0"), ("request_timeout", "nan"), ("grace", "-1"),
    ("max_item_bytes", "100"), ("embedded", "maybe"), ("log_level", "LOUD"),
    ("nats_url", "nats://h:99999"), ("nats_url", "nats://h:abc"), ("nats_url", "http://h:1"),
    ("nats_url", "nats://h:1,"), ("prefix", "a.>"), ("tls_ca", "/nonexistent"),
    ("nkey", "/nonexistent"),
])
def test_a_bad_value_names_its_variable_and_its_flag(name: str, raw: str) -> None:
    with pytest.raises(ConfigError, match=f"CONVLOG_{name.upper()}="):
        load_settings(environ={f"CONVLOG_{name.upper()}": raw})
    with pytest.raises(ConfigError, match=f"--{name.replace('_', '-')}="):
        load_settings({name: raw}, environ={})


# An empty path is no path: `--data-dir ""` (a script's unset variable) or a blank
# CONVLOG_DATA_DIR was Path(""), the working directory, and the log service created its
# database there without a word.
@pytest.mark.parametrize("name", ["data_dir", "db", "agents", "keyring", "signing_key"])
@pytest.mark.parametrize("raw", ["", "  "])
def test_an_empty_path_is_refused(name: str, raw: str, tmp_path: Path) -> None:
    env = {"CONVLOG_DATA_DIR": str(tmp_path)}
    with pytest.raises(ConfigError, match=f"--{name.replace('_', '-')}=.* an empty path"):
        load_settings({name: raw}, environ=env, check_paths=False)
    if raw.strip() != raw:  # (an empty variable is an unset one)
        with pytest.raises(ConfigError, match=f"CONVLOG_{name.upper()}=.* an empty path"):
            load_settings(environ={**env, f"CONVLOG_{name.upper()}": raw}, check_paths=False)


def test_a_tls_key_without_its_certificate_is_refused(tmp_path: Path) -> None:
    # CONVLOG_TLS_KEY alone was checked to exist, then never loaded: the processes connected
    # without a client certificate (on a nats:// URL, without TLS at all), saying nothing.
    key = tmp_path / "client.key"
    key.write_text("not loaded\n")
    with pytest.raises(ConfigError, match="CONVLOG_TLS_KEY=.*CONVLOG_TLS_CERT is not set"):
        load_settings(environ={"CONVLOG_DATA_DIR": str(tmp_path), "CONVLOG_TLS_KEY": str(key)})


def test_paths_are_checked_only_when_asked(tmp_path: Path) -> None:
    env = {"CONVLOG_CREDS": "/etc/convlog/nope.creds", "CONVLOG_DATA_DIR": str(tmp_path)}
    with pytest.raises(ConfigError, match="CONVLOG_CREDS"):
        load_settings(environ=env)
    assert load_settings(environ=env, check_paths=False).creds == "/etc/convlog/nope.creds"


def test_nats_servers_and_defaults() -> None:
    assert nats_servers("nats://127.0.0.1:4222, demo:5") == [("127.0.0.1", 4222), ("demo", 5)]
    assert nats_servers("tls://h") == [("h", 4222)]
    assert Settings().nats_url == "nats://127.0.0.1:4222"


# CONVLOG_HEAD_INTERVAL has a range: 0 or less made the head witness spin, nan/inf never sign
@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_a_head_interval_that_cannot_work_is_refused(value: str) -> None:
    with pytest.raises(ConfigError, match="CONVLOG_HEAD_INTERVAL"):
        load_settings(environ={"CONVLOG_HEAD_INTERVAL": value}, check_paths=False)
