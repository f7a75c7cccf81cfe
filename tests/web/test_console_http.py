"""The console's HTTP side against a real log service: listing, export, live tail,
read-only, authentication, host and content-security guards, and the CLI's refusals."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from services.log.service import LogService
from services.web.app import WebOptions
from services.web.cli import bind, console_url, serve
from shared.chain import verify
from shared.client import LogClient
from shared.codec import decode
from shared.config import load_settings
from shared.messages import Envelope
from tests.support.natsd import NatsServer
from tests.support.procs import REPO_ROOT


@dataclass
class Console:
    url: str
    client: LogClient
    service: LogService | None = None

    async def get(self, path: str, headers: dict[str, str] | None = None, method: str = "GET",
                  ) -> tuple[int, dict[str, str], bytes]:
        def call() -> tuple[int, dict[str, str], bytes]:
            req = urllib.request.Request(self.url.rstrip("/") + path, headers=headers or {}, method=method)
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
            except urllib.error.HTTPError as e:
                return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()

        return await asyncio.to_thread(call)


@contextlib.asynccontextmanager
async def console(server: NatsServer, tmp: Path, options: WebOptions, host: str = "127.0.0.1",
                  ) -> AsyncIterator[Console]:
    settings = load_settings({"nats_url": server.url, "db": str(tmp / "log.db"), "data_dir": str(tmp)},
                             environ={})
    service = LogService(settings)
    await service.start()
    client = await LogClient.connect(server.url, name="web-test")
    sock = bind(host, 0)
    stop = asyncio.Event()
    task = asyncio.create_task(serve(client, sock, options, stop))
    try:
        yield Console(console_url(sock), client, service)
    finally:
        stop.set()
        await task
        await client.close()
        await service.shutdown()


@pytest.fixture
async def web(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[Console]:
    async with console(nats_server, tmp_path, WebOptions(heartbeat=0.5)) as c:
        yield c


def said(agent: str, text: str) -> dict[str, Any]:
    return {"agent": agent, "data": {"type": "message", "role": "assistant", "content": text}}


async def test_sessions_newest_first_prefix_paging_and_agents(web: Console) -> None:
    for sid, agent in [("a-1", "Triage"), ("b-1", "L1Billing"), ("a-2", "Triage"), ("a-3", "L2Support")]:
        await web.client.append(sid, [said(agent, "hi"), said("system", "note")])
    await web.client.append("a-1", [said("L1Billing", "later")])  # a-1 is now the newest
    status, _, body = await web.get("/api/sessions?limit=2")
    page1 = json.loads(body)
    assert status == 200 and page1["total"] == 4
    assert [s["session_id"] for s in page1["sessions"]] == ["a-1", "a-3"]
    assert page1["sessions"][0] == {**page1["sessions"][0], "items": 3, "agents": ["Triage", "L1Billing"]}
    _, _, body = await web.get(f"/api/sessions?limit=2&cursor={page1['next']}")
    page2 = json.loads(body)
    assert [s["session_id"] for s in page2["sessions"]] == ["a-2", "b-1"] and page2["next"] is None
    _, _, body = await web.get("/api/sessions?prefix=a-")
    assert [s["session_id"] for s in json.loads(body)["sessions"]] == ["a-1", "a-3", "a-2"]
    _, _, body = await web.get("/api/sessions?prefix=b")
    assert [s["session_id"] for s in json.loads(body)["sessions"]] == ["b-1"]


@pytest.mark.parametrize(("query", "words"), [
    ("prefix=a.b", "prefix"), ("prefix=" + "x" * 129, "prefix"), ("limit=0", "limit"), ("limit=abc", "limit"),
])
async def test_bad_listing_queries_are_refused(web: Console, query: str, words: str) -> None:
    status, _, body = await web.get(f"/api/sessions?{query}")
    assert status == 400
    err = json.loads(body)["error"]
    assert err["code"] == "bad_request" and words in err["message"]


async def test_export_is_every_envelope_and_verifies(web: Console) -> None:
    await web.client.append("s1", [said("Triage", f"m{i}") for i in range(450)])  # more than one page
    await web.client.append("s1", [{"agent": "Triage", "kind": "retract", "data": {"target": 3}}])
    status, headers, body = await web.get("/sessions/s1/export.jsonl?download=1")
    assert status == 200 and headers["content-type"].startswith("application/jsonl")
    assert headers["content-disposition"] == 'attachment; filename="s1.jsonl"'
    envs = [decode(line, Envelope) for line in body.splitlines()]
    assert [e.item_order for e in envs] == list(range(1, 452))
    assert verify(envs, session_id="s1") is None
    assert envs == await web.client.items("s1")  # byte-for-byte the envelopes the log holds


async def _large_session(web: Console, sid: str, batches: int) -> None:
    """``batches`` appends of 40 items of 16 kB each."""
    for k in range(batches):
        await web.client.append(sid, [said("Triage", f"{k}-{i} " + "x" * 16_000) for i in range(40)])


async def _pieces(web: Console, path: str, *, pause: float = 0.0, until: bytes | None = None) -> list[bytes]:
    """The chunked body of ``GET path`` piece by piece, as the console sent it (a raw
    socket), read ``pause`` seconds after the headers (a slow page), to its end or to the
    piece that holds ``until``."""
    import socket
    import time
    from urllib.parse import urlsplit

    port = urlsplit(web.url).port
    assert port is not None
    close = b"" if until else b"Connection: close\r\n"

    def chunks() -> list[bytes]:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n%s\r\n" % (path.encode(), close))
            f = s.makefile("rb")
            assert f.readline().startswith(b"HTTP/1.1 200")
            while f.readline() not in (b"\r\n", b""):
                pass
            time.sleep(pause)
            out: list[bytes] = []
            while not (until and out and until in out[-1]):
                n = int(f.readline().split(b";")[0], 16)
                if not n:
                    break
                out.append(f.read(n))
                f.readline()
            return out

    return await asyncio.to_thread(chunks)


async def test_an_export_of_large_items_is_sent_as_it_is_read(web: Console) -> None:
    """The export gathered 2,000 envelopes before it sent any, whatever their size: a
    session of 2,120 items of 16 kB went out as one 32 MB piece, held in the console
    (twice, while joined) -- with items of 256 kB, half a gigabyte per open page."""
    await _large_session(web, "big", 53)
    pieces = await _pieces(web, "/sessions/big/export.jsonl")
    envs = [decode(line, Envelope) for line in b"".join(pieces).splitlines()]
    assert [e.item_order for e in envs] == list(range(1, 53 * 40 + 1))
    assert max(len(p) for p in pieces) <= 2 << 20, sorted(len(p) for p in pieces)[-3:]


async def test_bad_and_unknown_sessions(web: Console) -> None:
    status, _, body = await web.get("/sessions/no-such/export.jsonl")
    assert status == 404 and json.loads(body)["error"]["code"] == "not_found"
    for path in ("/sessions/a.b/export.jsonl", "/sessions/a%2Ab", "/sessions/a.b/live"):
        status, _, body = await web.get(path)
        assert status == 400, path
        assert json.loads(body)["error"]["code"] == "invalid_session_id"
    status, _, body = await web.get("/sessions/s1/live?after=-1")
    assert status == 400 and "after" in json.loads(body)["error"]["message"]


def _events(body: bytes) -> list[tuple[int, dict[str, Any]]]:
    out, event_id = [], None
    for line in body.decode().splitlines():
        if line.startswith("id: "):
            event_id = int(line[4:])
        elif line.startswith("data: ") and event_id is not None:
            out.append((event_id, json.loads(line[6:])))
            event_id = None
    return out


async def _sse_events(url: str, n: int, headers: dict[str, str] | None = None) -> list[tuple[int, dict[str, Any]]]:
    def call() -> list[tuple[int, dict[str, Any]]]:
        out: list[tuple[int, dict[str, Any]]] = []
        req = urllib.request.Request(url, headers=headers or {})
        with urllib.request.urlopen(req, timeout=10) as r:
            event_id = None
            for raw in r:
                line = raw.decode().rstrip("\n")
                if line.startswith("id: "):
                    event_id = int(line[4:])
                elif line.startswith("data: "):
                    out.append((event_id, json.loads(line[6:])))
                    if len(out) == n:
                        return out
        return out

    return await asyncio.to_thread(call)


async def test_live_tail_streams_new_items_and_resumes(web: Console) -> None:
    await web.client.append("s2", [said("Triage", "one"), said("Triage", "two")])
    reader = asyncio.create_task(_sse_events(web.url + "sessions/s2/live?after=1", 3))
    await web.client.append("s2", [said("L1Billing", "three")])
    await web.client.append("s2", [said("L1Billing", "four")])
    events = await asyncio.wait_for(reader, 15)
    assert [(i, e["item_order"], e["data"]["content"]) for i, e in events] == [
        (2, 2, "two"), (3, 3, "three"), (4, 4, "four")]
    # A reconnecting EventSource sends Last-Event-ID: the stream resumes after it.
    events = await asyncio.wait_for(
        _sse_events(web.url + "sessions/s2/live?after=0", 1, {"Last-Event-ID": "3"}), 15)
    assert [e["item_order"] for _, e in events] == [4]


async def test_a_live_tail_of_large_items_is_sent_in_bounded_pieces(web: Console) -> None:
    """The live tail sent up to 500 queued envelopes as one piece and queued 1,000 for a
    reader, whatever their size: a page opened on a session of 16 kB items got its
    history in pieces of 8 MB (with items of 256 kB: 128 MB joined at once, and 256 MB
    queued for one slow page), as the export did before it was bounded by bytes."""
    await _large_session(web, "big-live", 40)
    # A slow page: the console queues what the follower reads meanwhile.
    pieces = await _pieces(web, "/sessions/big-live/live?after=0", pause=3, until=b"id: 1600\n")
    orders = [int(line[4:]) for line in b"".join(pieces).splitlines() if line.startswith(b"id: ")]
    assert orders == list(range(1, 1601))
    assert max(len(p) for p in pieces) <= 2 << 20, sorted(len(p) for p in pieces)[-3:]


async def test_read_only_and_security_headers(web: Console) -> None:
    await web.client.append("s3", [said("Triage", "keep")])
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        status, headers, body = await web.get("/sessions/s3/export.jsonl", method=method)
        assert status == 405 and headers["allow"] == "GET, HEAD"
        assert json.loads(body)["error"]["code"] == "read_only"
    assert await web.client.last_order("s3") == 1
    for path in ("/", "/sessions/s3", "/verify", "/static/session.js", "/api/sessions"):
        status, headers, _ = await web.get(path)
        assert status == 200, path
        assert "script-src 'self'" in headers["content-security-policy"]
        assert "unsafe-inline" not in headers["content-security-policy"]
        assert headers["x-content-type-options"] == "nosniff"
    # A page from another origin rebinding its name to 127.0.0.1 is not answered.
    status, _, body = await web.get("/api/sessions", {"Host": "attacker.example:8080"})
    assert status == 421 and json.loads(body)["error"]["code"] == "bad_host"
    for host in ("localhost:8080", "127.0.0.1", "[::1]:8080"):
        assert (await web.get("/api/sessions", {"Host": host}))[0] == 200


async def test_a_console_bound_to_another_loopback_address_answers_on_it(nats_server: NatsServer,
                                                                          tmp_path: Path) -> None:
    """`convlog web --host 127.0.0.2` (any of 127/8 is loopback: served without a token)
    answered every request to its own URL with 421 bad_host: only 127.0.0.1, localhost
    and ::1 counted as loopback host names."""
    async with console(nats_server, tmp_path, WebOptions(loopback_only=True), host="127.0.0.2") as web:
        assert web.url.startswith("http://127.0.0.2:")
        await web.client.append("lo-2", [said("Triage", "on 127.0.0.2")])
        status, _, body = await web.get("/sessions/lo-2/export.jsonl")  # Host: 127.0.0.2:<port>
        assert status == 200 and b"on 127.0.0.2" in body
        assert (await web.get("/api/sessions", {"Host": "localhost"}))[0] == 200
        # A name, even one resolving to loopback (DNS rebinding), is still refused.
        for host in ("attacker.example", "127.0.0.2.nip.io", "0x7f.0.0.2"):
            status, _, body = await web.get("/api/sessions", {"Host": host})
            assert status == 421 and json.loads(body)["error"]["code"] == "bad_host", host


async def test_token_is_required_when_set_and_never_reaches_a_page(nats_server: NatsServer, tmp_path: Path) -> None:
    token = "s3cret-token-value"
    async with console(nats_server, tmp_path, WebOptions(token=token, loopback_only=False)) as web:
        await web.client.append("s4", [said("Triage", "private")])
        for path in ("/", "/sessions/s4", "/sessions/s4/export.jsonl", "/api/sessions", "/static/chain.js"):
            status, headers, _ = await web.get(path)
            assert status == 401, path
            assert headers["www-authenticate"].startswith("Basic realm=")
        wrong = base64.b64encode(b"auditor:guess").decode()
        for bad in (f"Bearer {token}x", f"Basic {wrong}", "Basic !!!", token):
            assert (await web.get("/api/sessions", {"Authorization": bad}))[0] == 401
        good = base64.b64encode(f"auditor:{token}".encode()).decode()
        for auth in (f"Bearer {token}", f"Basic {good}"):
            # Any Host is fine once authenticated (the console was bound beyond loopback).
            status, _, body = await web.get("/sessions/s4/export.jsonl",
                                            {"Authorization": auth, "Host": "console.example"})
            assert status == 200 and b"private" in body
        for path in ("/", "/sessions/s4", "/static/session.js", "/static/chain.js", "/api/sessions"):
            _, _, body = await web.get(path, {"Authorization": f"Bearer {token}"})
            assert token.encode() not in body


async def _cli(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli.main", "web", *args, cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_cli_refuses_to_serve_beyond_loopback_without_a_token() -> None:
    code, out = await _cli("--host", "0.0.0.0", "--port", "0", "--no-embedded")
    assert code == 2 and "refusing to serve on 0.0.0.0 without a token" in out
    code, out = await _cli("--certfile", "x.pem", "--port", "0", "--no-embedded")
    assert code == 2 and "--certfile and --keyfile go together" in out


async def test_cli_refuses_a_certificate_it_cannot_load_before_serving(web: Console, nats_server: NatsServer,
                                                                         tmp_path: Path) -> None:
    """A missing or malformed --certfile/--keyfile was found only once the console had
    announced its https URL: 'No such file or directory' (no path) or '[SSL] PEM lib', exit 1."""
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    for cert in (tmp_path / "missing.pem", junk):
        code, out = await _cli("--certfile", str(cert), "--keyfile", str(cert), "--port", "0",
                               "--nats-url", nats_server.url, "--no-embedded")
        assert code == 2, out
        assert f"--certfile {cert} / --keyfile {cert}: cannot load the certificate and key" in out
        assert "console at" not in out and "Traceback" not in out


@pytest.mark.parametrize("port", ["70000", "-1"])
async def test_cli_refuses_a_port_out_of_range_in_one_line(port: str) -> None:
    code, out = await _cli("--port", port, "--no-embedded")  # socket.bind raised OverflowError
    assert code == 2 and f"argument --port: expected a port number 0-65535, got '{port}'" in out
    assert "Traceback" not in out
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli.main", "demo", "--web", "--web-port", port, cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out = (await asyncio.wait_for(proc.communicate(), 30))[0].decode()
    assert proc.returncode == 2 and "argument --web-port: expected a port number 0-65535" in out


async def test_cli_serves_the_console_and_stops_on_sigterm(web: Console, nats_server: NatsServer,
                                                           tmp_path: Path) -> None:
    from tests.support.procs import Proc

    await web.client.append("cli-1", [said("Triage", "served by convlog web")])
    proc = Proc([sys.executable, "-m", "services.cli.main", "web", "--port", "0",
                 "--nats-url", nats_server.url, "--no-embedded"], log_dir=tmp_path, name="convlog-web")
    with proc:
        m = await asyncio.to_thread(proc.wait_for_line, r"console at (http://127\.0\.0\.1:\d+/)", 20)
        cli = Console(m.group(1), web.client)
        status, _, body = await cli.get("/sessions/cli-1/export.jsonl")
        assert status == 200 and b"served by convlog web" in body
        _, _, body = await cli.get("/api/sessions")
        assert [s["session_id"] for s in json.loads(body)["sessions"]] == ["cli-1"]
        assert await asyncio.to_thread(proc.terminate, 10) == 0


async def test_cli_stops_gracefully_on_sighup(web: Console, nats_server: NatsServer, tmp_path: Path) -> None:
    """SIGHUP (a closed terminal, ``kill -HUP``) starts the same graceful stop as SIGTERM,
    as the README says of every long-running command; Python's default ended
    ``convlog web`` at once (killed by the signal, exit -1)."""
    import os
    import signal

    from tests.support.procs import Proc

    proc = Proc([sys.executable, "-m", "services.cli.main", "web", "--port", "0",
                 "--nats-url", nats_server.url, "--no-embedded"], log_dir=tmp_path, name="convlog-web")
    with proc:
        await asyncio.to_thread(proc.wait_for_line, r"console at http://127\.0\.0\.1:\d+/", 20)
        os.kill(proc.pid, signal.SIGHUP)
        assert await asyncio.to_thread(proc.wait, 10) == 0, proc.output()
        assert "Traceback" not in proc.output()


async def test_cli_stops_cleanly_with_a_live_tail_open(web: Console, nats_server: NatsServer,
                                                      tmp_path: Path) -> None:
    """Every session page keeps a live tail open.  SIGTERM (or Ctrl-C) then waited out
    uvicorn's graceful timeout and cancelled the tail: 'ERROR: Cancel 1 running task(s)'
    and 'ERROR: Exception in ASGI application' with a CancelledError traceback."""
    import socket
    import time

    from tests.support.procs import Proc

    await web.client.append("cli-2", [said("Triage", "followed")])
    proc = Proc([sys.executable, "-m", "services.cli.main", "web", "--port", "0",
                 "--nats-url", nats_server.url, "--no-embedded"], log_dir=tmp_path, name="convlog-web")
    with proc:
        m = await asyncio.to_thread(proc.wait_for_line, r"console at http://127\.0\.0\.1:(\d+)/", 20)

        def open_tail() -> socket.socket:
            s = socket.create_connection(("127.0.0.1", int(m.group(1))), timeout=10)
            s.sendall(b"GET /sessions/cli-2/live?after=0 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            got = b""
            while b"followed" not in got:
                got += s.recv(65536)
            return s

        tail = await asyncio.to_thread(open_tail)
        try:
            t0 = time.monotonic()
            assert await asyncio.to_thread(proc.terminate, 10) == 0
            took = time.monotonic() - t0
        finally:
            tail.close()
        out = proc.output()
        assert "Traceback" not in out and "ERROR" not in out, out[-3000:]
        assert took < 1.5, took


async def test_cli_stops_cleanly_while_an_export_is_streaming(web: Console, nats_server: NatsServer,
                                                             tmp_path: Path) -> None:
    """SIGTERM while a page (or a download) was still reading a long export: uvicorn
    waited out its graceful timeout, then cancelled the export -- 'ERROR: Cancel 1
    running task(s)' and 'ERROR: Exception in ASGI application' with a traceback."""
    import socket
    import time

    from tests.support.procs import Proc

    for k in range(40):
        await web.client.append("cli-3", [said("Triage", f"{k}-{i} " + "x" * 16_000) for i in range(40)])
    proc = Proc([sys.executable, "-m", "services.cli.main", "web", "--port", "0",
                 "--nats-url", nats_server.url, "--no-embedded"], log_dir=tmp_path, name="convlog-web")
    with proc:
        m = await asyncio.to_thread(proc.wait_for_line, r"console at http://127\.0\.0\.1:(\d+)/", 20)

        def open_export() -> socket.socket:
            s = socket.create_connection(("127.0.0.1", int(m.group(1))), timeout=10)
            s.sendall(b"GET /sessions/cli-3/export.jsonl HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            got = b""
            while b"0-0 " not in got:
                got += s.recv(65536)
            return s  # and read no more: the export waits for this reader

        reader = await asyncio.to_thread(open_export)
        try:
            await asyncio.sleep(1)
            t0 = time.monotonic()
            code = await asyncio.to_thread(proc.terminate, 10)
            took = time.monotonic() - t0
            rest = b""
            with contextlib.suppress(OSError):  # cut off: reset, or closed
                while more := reader.recv(1 << 20):
                    rest += more
        finally:
            reader.close()
        assert not rest.endswith(b"\r\n0\r\n\r\n")  # no last chunk: the reader sees the export is cut
        out = proc.output()
        assert code == 0, out[-3000:]
        assert "Traceback" not in out and "ERROR" not in out, out[-3000:]
        assert took < 1.5, took


async def test_cli_stops_at_once_while_a_request_waits_for_the_log_service(web: Console, nats_server: NatsServer,
                                                                         tmp_path: Path) -> None:
    """SIGTERM while a page's request waited for a log service that did not answer (down, or
    slow: the console waits up to its 10 s deadline): uvicorn waited out its graceful timeout,
    then cancelled the request -- 'ERROR: Cancel 1 running task(s)' and 'ERROR: Exception in
    ASGI application' with a CancelledError traceback, and the page got no answer at all.
    Such a request is now answered 503 'the console is stopping' at once."""
    import socket
    import time

    from tests.support.procs import Proc

    await web.client.append("cli-4", [said("Triage", "kept")])
    proc = Proc([sys.executable, "-m", "services.cli.main", "web", "--port", "0",
                 "--nats-url", nats_server.url, "--no-embedded"], log_dir=tmp_path, name="convlog-web")
    with proc:
        m = await asyncio.to_thread(proc.wait_for_line, r"console at http://127\.0\.0\.1:(\d+)/", 20)
        assert web.service is not None
        await web.service.shutdown()  # nothing answers the console's reads now
        waiting = []
        for path in ("/sessions/cli-4/export.jsonl", "/api/sessions"):
            s = socket.create_connection(("127.0.0.1", int(m.group(1))), timeout=10)
            s.sendall(b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % path.encode())
            waiting.append(s)
        try:
            await asyncio.sleep(0.5)  # both wait for the log service
            t0 = time.monotonic()
            code = await asyncio.to_thread(proc.terminate, 10)
            took = time.monotonic() - t0
            answers = []
            for s in waiting:
                got = b""
                with contextlib.suppress(OSError):
                    while more := s.recv(65536):
                        got += more
                answers.append(got)
        finally:
            for s in waiting:
                s.close()
        out = proc.output()
        assert code == 0, out[-3000:]
        assert "Traceback" not in out and "ERROR" not in out, out[-3000:]
        assert took < 1.5, took
        for got in answers:
            assert got.startswith(b"HTTP/1.1 503 "), got[:300]
            assert b'"code":"unavailable"' in got and b"the console is stopping" in got, got[-300:]


async def test_agents_of_a_long_session_are_scanned_in_bounded_steps(web: Console) -> None:
    from services.web.index import SessionIndex

    await web.client.append("long-1", [said("Triage", "a"), said("Triage", "b"), said("user", "c"),
                                       said("L1Billing", "d"), said("L2Support", "e")])
    index = SessionIndex(web.client, scan_budget=3, ttl=0)
    rows, _, _ = await index.page()
    assert (rows[0].agents, rows[0].agents_partial) == (["Triage"], True)
    rows, _, _ = await index.page()
    assert (rows[0].agents, rows[0].agents_partial) == (["Triage", "L1Billing", "L2Support"], False)
    await web.client.append("long-1", [said("Senior", "f")])  # only what is new is read
    rows, _, _ = await index.page()
    assert (rows[0].items, rows[0].agents[-1], rows[0].agents_partial) == (6, "Senior", False)


@pytest.mark.parametrize("after", ["%C2%B2", "9" * 5000, "9" * 30])  # "²" passes str.isdigit(); int() refuses the others or overflows the follow
async def test_a_live_after_that_is_no_small_integer_is_a_bad_request(web: Console, after: str) -> None:
    await web.client.append("s1", [said("Triage", "one")])
    status, _, body = await web.get(f"/sessions/s1/live?after={after}")
    assert status == 400, (status, body[:200])
    assert json.loads(body)["error"]["code"] == "bad_request"
    status, _, body = await web.get("/sessions/s1/live", {"Last-Event-ID": "\u00b2".encode().decode("latin-1")})
    assert status == 400, (status, body[:200])


@pytest.mark.parametrize("after", ["9007199254740992", "999999999999999999"])  # 2**53, and 18 digits
async def test_a_live_after_past_the_largest_item_order_is_a_bad_request(web: Console, after: str) -> None:
    """The log reads orders up to 2**53-1 only.  A larger ``after`` (or Last-Event-ID) passed
    the console's check (up to 18 digits): the tail answered 200, its follower died on the
    log's refusal, and the stream ended at once with nothing (an EventSource reconnects to
    that every second)."""
    await web.client.append("s1", [said("Triage", "one")])
    status, _, body = await web.get(f"/sessions/s1/live?after={after}")
    assert status == 400, (status, body[:200])
    assert json.loads(body)["error"]["code"] == "bad_request"
    status, _, body = await web.get("/sessions/s1/live", {"Last-Event-ID": after})
    assert status == 400 and json.loads(body)["error"]["code"] == "bad_request", (status, body[:200])


async def _walk_sessions(web: Console, limit: int, between: Any = None) -> list[str]:
    """Every session id the console lists, page by page (``between`` runs after each page)."""
    out: list[str] = []
    cursor = None
    while True:
        status, _, body = await web.get(f"/api/sessions?limit={limit}" + (f"&cursor={cursor}" if cursor else ""))
        assert status == 200, body
        page = json.loads(body)
        out += [s["session_id"] for s in page["sessions"]]
        cursor = page["next"]
        if not cursor:
            return out
        if between is not None:
            await between(out)


async def test_sessions_paging_neither_skips_nor_repeats_at_ties_or_under_writes(web: Console) -> None:
    """Sessions committed together share one updated_at: paging through them (page
    boundaries inside the tie) lists each once.  Writes while paging move a session up,
    never down: a session already shown is not shown again, new sessions and the ones
    that moved are on the first page, and every other session is still listed once."""
    tied = [f"tie-{k:02d}" for k in range(40)]
    await asyncio.gather(*(web.client.append(s, [said("Triage", "x")]) for s in tied))
    rows = [s for s in (await web.client.sessions(limit=100)).sessions if s.session_id in tied]
    assert len({s.updated_at for s in rows}) < len(rows)  # ties, committed in one batch
    listed = await _walk_sessions(web, 7)
    assert sorted(listed) == tied

    moved: list[str] = []

    async def write(shown: list[str]) -> None:  # the page's last (its cursor) and a new session
        if len(moved) == 2:
            return
        moved.append(shown[-1])
        await web.client.append(shown[-1], [said("Triage", "again")])
        await web.client.append(f"new-{len(moved)}", [said("Triage", "new")])
        await asyncio.sleep(2.1)  # past the listing's cache

    listed = await _walk_sessions(web, 6, write)
    assert len(listed) == len(set(listed)) and sorted(listed) == tied
    _, _, body = await web.get("/api/sessions?limit=50")
    first = [s["session_id"] for s in json.loads(body)["sessions"]]
    assert set(first[: 2 * len(moved)]) == {*moved, *(f"new-{k}" for k in range(1, len(moved) + 1))}


async def test_a_head_of_the_live_tail_ends_and_the_connection_serves_the_next_request(web: Console) -> None:
    """HEAD is allowed everywhere, but a HEAD of ``/live`` started a follower and never
    ended its (bodiless) response: the keep-alive connection then answered no further
    request, and the follower stayed subscribed until the client hung up."""
    import socket
    from urllib.parse import urlsplit

    await web.client.append("h1", [said("Triage", "one")])
    port = urlsplit(web.url).port
    assert port is not None

    def head_then_get() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"HEAD /sessions/h1/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                      b"GET /api/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            got = b""
            with contextlib.suppress(TimeoutError):
                while chunk := s.recv(65536):
                    got += chunk
            return got

    got = await asyncio.to_thread(head_then_get)
    head, _, rest = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in head, got[:500]
    assert rest.startswith(b"HTTP/1.1 200") and b'"session_id":"h1"' in rest, got[:1000]


async def test_a_head_of_an_export_reads_only_its_first_page(web: Console) -> None:
    """HEAD is allowed everywhere, but a HEAD of ``export.jsonl`` streamed the whole
    session from the log service (page after page) only for the server to drop the body."""
    assert web.service is not None
    await web.client.append("short", [said("Triage", "one")])
    for k in range(3):
        await web.client.append("long", [said("Triage", f"m{k}-{i}") for i in range(1000)])

    async def reads_of_a_head(sid: str) -> int:
        before = web.service.tally["read"]
        status, headers, body = await web.get(f"/sessions/{sid}/export.jsonl", method="HEAD")
        assert status == 200 and body == b"" and headers["content-type"].startswith("application/jsonl")
        return web.service.tally["read"] - before

    assert await reads_of_a_head("long") == await reads_of_a_head("short")
    status, _, _ = await web.get("/sessions/nobody/export.jsonl", method="HEAD")
    assert status == 404


async def test_a_live_tail_whose_follower_fails_ends_at_once_and_logs_why_once(
        nats_server: NatsServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A follower that died on an error it does not wait out (here: a log file edited by
    hand, whose stored envelope is no envelope, so the log's answer cannot be read) left
    the stream open until the next idle heartbeat (10 s by default), said nothing in the
    log, and the browser reconnected to the same end in a loop.  The stream now ends at
    once with a ``failed`` event naming the reason, and the console logs it once
    (WARNING, naming the session)."""
    import logging
    import sqlite3
    import time

    from services.log.store.sqlite import SQLiteStore
    from shared.messages import AppendItem, AppendRequest

    store = SQLiteStore(tmp_path / "log.db")
    await store.open()
    await store.append("s", AppendRequest(items=[AppendItem(**said("Triage", "hello"))]))
    await store.close()
    with contextlib.closing(sqlite3.connect(tmp_path / "log.db")) as db, db:
        db.execute("UPDATE items SET envelope = ? WHERE session_id = 's'", (b'{"spoiled": true}',))
    caplog.set_level(logging.WARNING, logger="convlog.web")
    async with console(nats_server, tmp_path, WebOptions(heartbeat=30)) as web:
        def tail() -> bytes:
            req = urllib.request.Request(web.url + "sessions/s/live?after=0")
            with urllib.request.urlopen(req, timeout=8) as r:  # far below the heartbeat
                return r.read()

        started = time.monotonic()
        body = await asyncio.to_thread(tail)
        assert time.monotonic() - started < 5, body
        *_, last = body.split(b"\n\n")[:-1]
        assert last.startswith(b'event: failed\ndata: {"error":"bad_request: '), body
        warnings = [r.getMessage() for r in caplog.records if r.name == "convlog.web" and r.levelno == logging.WARNING]
        assert len(warnings) == 1 and warnings[0].startswith(
            "live tail of session s ended: its follower failed: "), warnings


@pytest.mark.parametrize("spoiled", [1, 200, 201, 260])  # the first page holds 200
async def test_the_export_of_a_log_edited_by_hand_names_the_item_that_is_no_envelope(
        nats_server: NatsServer, tmp_path: Path, spoiled: int) -> None:
    """A stored envelope that is not JSON (a log file edited by hand) spoiled the log's
    whole read reply: the export failed with a generic ``bad_request: malformed JSON ...
    (byte 28)`` naming no item, or, in a later page, ended the download short.  It now
    holds every other envelope and, where the bad one is, a line naming its order, so
    the page and ``convlog replay --file --verify`` break the chain there."""
    import sqlite3

    from services.log.store.sqlite import SQLiteStore
    from shared.messages import AppendItem, AppendRequest
    from tests.support.procs import run_cli

    store = SQLiteStore(tmp_path / "log.db")
    await store.open()
    for n in range(0, 260, 20):
        await store.append("s", AppendRequest(items=[AppendItem(**said("Triage", f"line {n + k}")) for k in range(20)]))
    await store.close()
    with contextlib.closing(sqlite3.connect(tmp_path / "log.db")) as db, db:
        db.execute("UPDATE items SET envelope = ? WHERE session_id = 's' AND item_order = ?",
                   (b"{oops", spoiled))
    async with console(nats_server, tmp_path, WebOptions(heartbeat=30)) as web:
        status, headers, body = await web.get("/sessions/s/export.jsonl")
    assert status == 200, body
    assert headers["x-convlog-last-order"] == "260"
    lines = [json.loads(x) for x in body.splitlines()]
    assert [x["item_order"] for x in lines] == list(range(1, 261))
    assert lines[spoiled - 1]["unreadable"].startswith("the stored envelope does not decode"), lines
    export = tmp_path / "s.jsonl"
    export.write_bytes(body)
    code, _, err = await run_cli("replay", "s", "--file", str(export), "--verify", env=None)
    assert code == 1 and err.startswith(f"FAILED: s: item_order {spoiled}: "), err


async def test_the_sessions_list_shows_a_session_whose_stored_envelope_is_no_envelope(
        nats_server: NatsServer, tmp_path: Path) -> None:
    """The list reads each session's items for its agents: one stored envelope that does not
    decode (a log file edited by hand) failed the whole list with a generic 400, so no
    session of the page could be opened, the tampered one included."""
    import sqlite3

    from services.log.store.sqlite import SQLiteStore
    from shared.messages import AppendItem, AppendRequest

    store = SQLiteStore(tmp_path / "log.db")
    await store.open()
    for sid in ("a", "b"):
        await store.append(sid, AppendRequest(items=[AppendItem(**said(agent, "hi"))
                                                     for agent in ("Triage", "L1Billing", "L2Support")]))
    await store.close()
    with contextlib.closing(sqlite3.connect(tmp_path / "log.db")) as db, db:
        db.execute("UPDATE items SET envelope = ? WHERE session_id = 'b' AND item_order = 2", (b"{oops",))
    async with console(nats_server, tmp_path, WebOptions(heartbeat=30)) as web:
        status, _, body = await web.get("/api/sessions")
    assert status == 200, body
    rows = {r["session_id"]: r for r in json.loads(body)["sessions"]}
    assert rows.keys() == {"a", "b"}
    assert rows["a"]["agents"] == ["Triage", "L1Billing", "L2Support"]
    assert rows["b"]["agents"] == ["Triage", "L2Support"], rows["b"]


async def test_an_export_with_the_log_service_down_fails_within_one_deadline(web: Console) -> None:
    """With the log service down, the export waited out the client's deadline twice, once
    for the fresh signed head (then served without it) and once more for the items it
    could no more read, before its 503: 20 s with `convlog web`'s deadline of 10 s, with
    the page saying nothing meanwhile.  The head's ``unavailable`` now answers at once."""
    import time

    await web.client.append("s1", [said("Triage", "one")])
    assert web.service is not None
    await web.service.shutdown()
    web.service = None
    web.client.deadline = 3.0
    started = time.monotonic()
    status, _, body = await web.get("/sessions/s1/export.jsonl")
    took = time.monotonic() - started
    assert status == 503 and json.loads(body)["error"]["code"] == "unavailable", body
    assert took < 4.0, f"the export took {took:.1f} s to fail with a deadline of 3 s"


async def test_a_listing_of_many_long_sessions_reads_at_most_its_budget_and_later_listings_finish_the_agents(
    web: Console,
) -> None:
    # Each session of a page was scanned up to scan_budget (20,000) envelopes for its
    # agents: a first page of 50 long sessions read a million before it showed anything.
    # The listing's sessions now share one budget; the next listings scan on.
    from services.web.index import SessionIndex

    n, long = 12, 2_000
    for k in range(n):
        items = [said("Triage", "hi")] + [said("user", f"m{i}") for i in range(long - 2)] + [said(f"Closer{k}", "bye")]
        await web.client.append(f"long-{k:02d}", items)
    read = [0]
    real_read = web.client.read

    async def counted(*args: Any, **kwargs: Any) -> Any:  # the log's replies, counted (real reads)
        rep = await real_read(*args, **kwargs)
        read[0] += len(rep.items)
        return rep

    web.client.read = counted  # type: ignore[method-assign]
    index = SessionIndex(web.client, ttl=0)  # the console's: a listing reads 10,000
    rows, _, total = await index.page()
    # The budget, and the pages read ahead (one per session, then dropped): not n × 2,000.
    assert read[0] <= 2 * 10_000, read[0]
    assert total == n and all(r.agents_partial and r.agents == ["Triage"] for r in rows)
    for _ in range(n * long // 10_000 + 1):  # later listings scan on
        rows, _, _ = await index.page()
    assert {r.session_id: (r.agents, r.agents_partial) for r in rows} == {
        f"long-{k:02d}": (["Triage", f"Closer{k}"], False) for k in range(n)
    }
