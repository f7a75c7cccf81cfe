"""The nats-py seam: the probe finds every private name it needs on the
installed nats-py, a missing one (or an untested version) is named and turns
the whole seam to nats-py's public API, and the tested range is the one
``pyproject.toml`` declares."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest
from nats.aio.client import Client
from nats.aio.subscription import Subscription

import shared.nats_seam as seam
from shared.config import ConfigError, load_settings

ROOT = Path(__file__).resolve().parents[2]


def _range_text() -> str:
    low, high = (".".join(map(str, v)) for v in seam.TESTED_NATS_PY)
    return f">={low},<{high}"


def test_installed_nats_py_is_a_tested_version_with_every_internal_the_seam_uses() -> None:
    found = seam.probe()
    assert found.tested, (
        f"nats-py {found.version} is not a version the suite ran on ({_range_text()}): "
        "run the whole suite on it, then widen TESTED_NATS_PY in shared/nats_seam.py "
        "and the nats-py range in pyproject.toml together"
    )
    assert found.missing == (), f"nats-py {found.version}: {found.reason()}"
    assert found.ok and found.reason() == ""
    assert seam.select() is seam.FAST


def test_pyproject_declares_the_tested_nats_py_range_with_the_nkeys_extra() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    nats_dep = [d for d in deps if re.match(r"nats-py\b", d)]
    assert nats_dep == [f"nats-py[nkeys]{_range_text()}"], nats_dep


def test_a_missing_method_is_named_and_the_seam_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(Client, "_flush_pending")
    found = seam.probe.__wrapped__()
    assert found.missing == ("Client._flush_pending",)
    assert "missing nats-py internals: Client._flush_pending" in found.reason()
    monkeypatch.setattr(seam, "probe", lambda: found)
    assert seam.select("auto") is seam.PUBLIC


def test_a_renamed_instance_attribute_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    class Renamed(Subscription):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            self._pending_bytes = self.__dict__.pop("_pending_size")

    monkeypatch.setattr(seam, "Subscription", Renamed)
    assert seam.probe.__wrapped__().missing == ("Subscription._pending_size",)


def test_an_untested_version_is_named_and_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.metadata.version
    monkeypatch.setattr(
        importlib.metadata, "version", lambda name: "2.99.0" if name == "nats-py" else real(name)
    )
    found = seam.probe.__wrapped__()
    assert not found.tested and not found.ok and found.missing == ()
    assert f"nats-py 2.99.0 is outside the tested range {_range_text()}" in found.reason()
    monkeypatch.setattr(seam, "probe", lambda: found)
    assert seam.select() is seam.PUBLIC


def test_public_mode_and_bindings() -> None:
    assert seam.select("public") is seam.PUBLIC
    assert not seam.PUBLIC.fast and seam.FAST.fast
    a, b = Client(), Client()
    assert seam.bind(a, "public") is seam.PUBLIC
    assert seam.seam_for(a) is seam.PUBLIC
    assert seam.seam_for(b) is seam.FAST  # nobody bound it: auto
    with pytest.raises(ValueError, match="auto, public"):
        seam.select("fastest")


def test_the_mode_is_a_setting_and_a_bad_value_names_the_variable() -> None:
    assert load_settings(environ={}).nats_seam == "auto"
    assert load_settings(environ={"CONVLOG_NATS_SEAM": "public"}).nats_seam == "public"
    with pytest.raises(ConfigError, match="CONVLOG_NATS_SEAM='fast' is invalid"):
        load_settings(environ={"CONVLOG_NATS_SEAM": "fast"})
