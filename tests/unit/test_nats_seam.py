"""The nats-py seam: the probe finds every private name it needs on the
installed nats-py, a missing one (or an untested version) is named and turns
the whole seam to nats-py's public API, and the tested range is the one
``pyproject.toml`` declares."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client
from nats.aio.subscription import Subscription

import shared.nats_seam as seam
import shared.nats_seam.probing as probing
from shared.config import ConfigError, load_settings

ROOT = Path(__file__).resolve().parents[2]


def _range_text() -> str:
    low, high = (".".join(map(str, v)) for v in seam.TESTED_NATS_PY)
    return f">={low},<{high}"


def test_installed_nats_py_is_a_tested_version_with_every_internal_the_seam_uses() -> None:
    found = seam.probe()
    assert found.tested, (
        f"nats-py {found.version} is not a version the suite ran on ({_range_text()}): "
        "run the whole suite on it, then widen TESTED_NATS_PY in shared/nats_seam/probing.py "
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

    monkeypatch.setattr(probing, "Subscription", Renamed)
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


# -- raw frames -----------------------------------------------------------------------


def _msg(subject: bytes, sid: int, payload: bytes, reply: bytes = b"") -> bytes:
    args = b" ".join(x for x in (subject, str(sid).encode(), reply, str(len(payload)).encode()) if x)
    return b"MSG " + args + b"\r\n" + payload + b"\r\n"


def _hmsg(subject: bytes, sid: int, headers: bytes, payload: bytes) -> bytes:
    sizes = f"{len(headers)} {len(headers) + len(payload)}".encode()
    return b"HMSG " + subject + b" " + str(sid).encode() + b" " + sizes + b"\r\n" + headers + payload + b"\r\n"


ROUTED = [
    _msg(b"_INBOX.x.1", 5, b"0123456789"),
    _msg(b"_INBOX.x.2", 5, b"wxyz", reply=b"reply.to"),
    _hmsg(b"_INBOX.x.1", 5, b"NATS/1.0\r\nNats-Sequence: 7\r\n\r\n", b'{"a":1}'),
    _msg(b"_INBOX.x.1", 5, b""),
    _hmsg(b"_INBOX.x.1", 5, b"NATS/1.0 204 EOB\r\nNats-Num-Pending: 0\r\n\r\n", b""),
]
OTHER = [_msg(b"other", 6, b"abc"), b"+OK\r\n"]


def _client() -> tuple[Client, list[tuple[str, bytes, bool]], list[str]]:
    """A client (no connection) whose sid 5 is routed raw and sid 6 is not."""
    nc = Client()
    got: list[tuple[str, bytes, bool]] = []  # subject, payload, a status message
    paths: list[str] = []
    fast = seam.FAST
    routed, other = Subscription(nc, id=5, subject="_INBOX.x.*"), Subscription(nc, id=6, subject="other")
    nc._subs[5], nc._subs[6] = routed, other

    def raw(subject: bytes, payload: bytes, headers: bytes | None) -> None:
        paths.append("raw")
        got.append((subject.decode(), payload, headers is not None and headers[8:9] == b" "))

    def msg_path(msg: Any) -> None:
        paths.append("msg")
        got.append((msg.subject, msg.data, "Status" in (msg.headers or {})))

    assert fast.deliver_inline(routed, msg_path) and fast.deliver_inline(other, msg_path)
    assert fast.deliver_raw(nc, routed, raw)
    return nc, got, paths


async def test_raw_frames_arrive_whole_at_any_split_and_the_rest_goes_through_nats_py() -> None:
    stream = b"".join(ROUTED + OTHER + ROUTED)
    want = [
        ("_INBOX.x.1", b"0123456789", False), ("_INBOX.x.2", b"wxyz", False), ("_INBOX.x.1", b'{"a":1}', False),
        ("_INBOX.x.1", b"", False), ("_INBOX.x.1", b"", True),
    ]
    want = [*want, ("other", b"abc", False), *want]
    for cut in range(len(stream) + 1):
        nc, got, _ = _client()
        await nc._ps.parse(stream[:cut])
        await nc._ps.parse(stream[cut:])
        assert got == want, cut
        assert nc._ps.buf == bytearray() and nc.stats["in_msgs"] == len(want)
    for size in (1, 2, 3, 7, 64):
        nc, got, paths = _client()
        only_routed = b"".join(ROUTED * 3)
        for i in range(0, len(only_routed), size):
            await nc._ps.parse(only_routed[i : i + size])
        assert got == want[:5] * 3 and set(paths) == {"raw"}, size


def test_the_public_seam_delivers_no_raw_frames() -> None:
    nc = Client()
    assert not seam.PUBLIC.deliver_raw(nc, Subscription(nc, id=5), lambda *a: None)
    assert getattr(nc._ps.parse, "__self__", None) is nc._ps


#: nats-py private names the fast seam uses, as they would appear in a use
#: (an attribute of a connection, subscription, parser, service or request).
_PRIVATE_USE = re.compile(
    r"\.(_send_command|_flush_pending|_flush_queue|_pending_queue|_pending_size|_ps|_endpoints|_transport"
    r"|_setup_nkeys_connect|_signature_cb)\b"
    r"|\b(nc|sub|msg|req)\._[a-z]"
)


def test_nats_py_private_names_are_used_only_behind_the_seam() -> None:
    seam_dir = ROOT / "shared" / "nats_seam"
    outside = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for top in ("services", "shared")
        for path in sorted((ROOT / top).rglob("*.py"))
        if seam_dir not in path.parents
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if _PRIVATE_USE.search(line)
    ]
    assert outside == [], "nats-py internals outside shared/nats_seam/:\n" + "\n".join(outside)
    inside = sum(len(_PRIVATE_USE.findall(p.read_text())) for p in seam_dir.glob("*.py"))
    assert inside >= 10  # the pattern does find the seam's own uses


def test_the_utf8_subject_guard_is_installed_only_over_the_build_message_it_was_written_for() -> None:
    """NonceCheckingClient replaces nats-py's private Client._build_message (a subject
    that is not UTF-8 stopped the read loop): only where its parameters are the tested
    ones; elsewhere nats-py's own runs, unchanged."""
    from nats.aio.client import Client

    from shared.nats_seam.login import NonceCheckingClient, build_message_fits

    assert build_message_fits()  # the pinned nats-py
    assert NonceCheckingClient._build_message is NonceCheckingClient._utf8_build_message

    class Other(Client):
        def _build_message(self, sid, subject, reply, data, headers, extra):  # type: ignore[no-untyped-def, override]
            return None

    class Gone:
        pass

    assert not build_message_fits(Other) and not build_message_fits(Gone)  # type: ignore[arg-type]
