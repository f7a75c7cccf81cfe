"""The signed demo path over TLS: ``deploy/nats/tls.conf`` with a CA the test
makes (``trustme``), mutual TLS, one nkey user per key, the log service
requiring signatures, workers with their own keys, a user message through
``convlog.in`` handed off from Triage to L1Billing, and ``replay --verify
--keyring`` over the same connection settings.  A plaintext client, and a TLS
client without a certificate of the CA, are refused before they can log in."""

from __future__ import annotations

import asyncio
import re
import shutil
import ssl
import sys
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest
import trustme

from services.cli.keys_cmds import make_keys
from services.log.service import LogService
from shared.client import LogClient
from shared.config import load_settings
from tests.support.eventually import assert_eventually
from tests.support.natscluster import wait_jetstream_placement
from tests.support.natsd import NatsServer, free_port
from tests.support.procs import REPO_ROOT, Proc, offline_env
from tests.support.workerstack import READY, signed_worker

TLS_CONF = REPO_ROOT / "deploy" / "nats" / "tls.conf"


def _write_certs(ca: trustme.CA, out: Path) -> dict[str, str]:
    """The CA, a server certificate for 127.0.0.1 and one client certificate, as PEM files."""
    out.mkdir()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("convlog-client@example.org", common_name="convlog client")
    files = {"ca": out / "ca.pem", "server": out / "server.pem", "server_key": out / "server-key.pem",
             "client": out / "client.pem", "client_key": out / "client-key.pem"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    server.cert_chain_pems[0].write_to_path(str(files["server"]))
    server.private_key_pem.write_to_path(str(files["server_key"]))
    client.cert_chain_pems[0].write_to_path(str(files["client"]))
    client.private_key_pem.write_to_path(str(files["client_key"]))
    return {k: str(v) for k, v in files.items()}


def _tls_config(certs: dict[str, str], store: Path) -> str:
    """deploy/nats/tls.conf with its paths moved to the test's CA and store."""
    text = TLS_CONF.read_text()
    text = re.sub(r'store_dir:\s*"[^"]*"', f'store_dir: "{store}"', text)
    for name, key in (("ca.pem", "ca"), ("server.pem", "server"), ("server-key.pem", "server_key")):
        text = text.replace(f'"/etc/convlog/tls/{name}"', f'"{certs[key]}"')
    live = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    assert not any("/etc/convlog" in line for line in live), "a path of tls.conf was not moved"
    return text


async def _plaintext_refused(port: int) -> str:
    """Speak plain NATS to the TLS port: the server demands TLS and drops us."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        info = await asyncio.wait_for(reader.readline(), 5)
        assert b'"tls_required":true' in info, info
        writer.write(b'CONNECT {"verbose":false}\r\nPUB convlog.in.t9 2\r\nhi\r\nPING\r\n')
        await writer.drain()
        rest = await asyncio.wait_for(reader.read(4096), 5)  # an error, then EOF; never PONG
        assert b"PONG" not in rest
        return rest.decode(errors="replace")
    finally:
        writer.close()


async def test_signed_demo_path_over_mutual_tls_and_plaintext_refused(tmp_path: Path) -> None:
    # Step 1: keys (and their nkey users), a CA with server and client certificates.
    keys = tmp_path / "keys"
    make_keys(keys, ["Triage", "L1Billing", "L1Technical", "L2Support"])
    certs = _write_certs(trustme.CA(), tmp_path / "tls")
    nats_dir = tmp_path / "nats"
    nats_dir.mkdir()
    shutil.copy(keys / "nats-users.conf", nats_dir / "nats-users.conf")
    server = NatsServer(nats_dir, jetstream=False, config=_tls_config(certs, nats_dir / "js")).start()
    url = f"tls://127.0.0.1:{server.port}"
    tls_env = {"CONVLOG_TLS_CA": certs["ca"], "CONVLOG_TLS_CERT": certs["client"],
               "CONVLOG_TLS_KEY": certs["client_key"]}
    ring = str(keys / "keyring.json")

    # Step 2: the log service (signatures required, heads signed) and two workers, each its own user.
    svc = LogService(load_settings(
        {"nats_url": url, "db": str(tmp_path / "convlog.db"), "keyring": ring, "require_signatures": True},
        {**tls_env, "CONVLOG_NKEY": str(keys / "log.nk"), "CONVLOG_SIGNING_KEY": str(keys / "log.nk")},
    ))
    procs: list[Proc] = []
    try:
        await svc.start()
        for agent in ("Triage", "L1Billing"):
            procs.append(signed_worker(agent, keys=keys, url=url, log_dir=tmp_path, env=tls_env).start())
        for p in procs:
            p.wait_for_line(READY, timeout=60)

        # Step 3: the user gateway sends a billing question; Triage hands off, L1Billing answers.
        gateway = await LogClient.connect(settings=load_settings({"nats_url": url}, {
            **tls_env, "CONVLOG_NKEY": str(keys / "gateway.nk"),
            "CONVLOG_SIGNING_KEY": str(keys / "gateway.nk")}), name="gateway")
        try:
            assert gateway.nc.connected_url is not None and gateway.nc.connected_url.scheme == "tls"
            await gateway.send("t1", "Hi, I was charged twice for my subscription this month.")

            async def answered() -> None:
                items = await gateway.items("t1")
                assert any(e.agent == "L1Billing" and e.item_id.endswith(".reply") for e in items), \
                    [(e.agent, e.item_id) for e in items]

            await assert_eventually(answered, timeout=40)
        finally:
            await gateway.close()

        # Step 4: replay --verify with the keyring, over TLS as the gateway user.
        replay = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.cli.main", "replay", "t1", "--verify", "--keyring", ring,
            "--nats-url", url, "--no-embedded",
            env={**offline_env(), **tls_env, "CONVLOG_NKEY": str(keys / "gateway.nk")},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(replay.communicate(), 60)
        assert replay.returncode == 0, err.decode()
        assert re.search(r"\d+ signatures valid, 0 unsigned; signed head at item_order \d+", err.decode()), \
            err.decode()
        assert "L1Billing" in out.decode() and "[unsigned]" not in out.decode()

        # Step 5: no TLS at all, or TLS without a client certificate: refused.
        said = await _plaintext_refused(server.port)
        assert "tls" in said.lower() or said == "", said
        ca_only = ssl.create_default_context(cafile=certs["ca"])
        logged = len(server.log_text())  # the plaintext attempt above logged a handshake error already
        with pytest.raises((OSError, nats.errors.Error)):  # nats-py raises what the socket says
            await nats.connect(url, tls=ca_only, nkeys_seed=str(keys / "gateway.nk"),
                               allow_reconnect=False, connect_timeout=3)

        def refused_for_no_client_certificate() -> None:
            # This attempt's own refusal, for the reason under test (Go: crypto/tls).
            assert "client didn't provide a certificate" in server.log_text()[logged:], server.log_text()[logged:]

        await assert_eventually(refused_for_no_client_certificate, timeout=5)
    finally:
        for p in procs:
            p.terminate(10)
        await svc.shutdown()
        server.stop()


def _cluster_node_config(certs: dict[str, str], store: Path, name: str, route_ports: list[int], mine: int) -> str:
    """tls.conf with its documented cluster block switched on, for node ``name``."""
    text = _tls_config(certs, store).replace("server_name: convlog-tls", f"server_name: {name}")
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("# For a cluster"))
    block = []
    for ln in lines[start + 1:]:
        if not ln.startswith("#"):
            break
        block.append(ln[4:] if ln.startswith("#   ") else ln[1:])
    cluster = "\n".join(block)
    cluster = cluster.replace("listen: 0.0.0.0:6222", f"listen: 127.0.0.1:{mine}")
    routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in route_ports)
    cluster = re.sub(r"routes: \[[^\]]*\]", f"routes: [ {routes} ]", cluster)
    cluster = cluster.replace('"/etc/convlog/tls/route.pem"', f'"{certs["server"]}"')
    cluster = cluster.replace('"/etc/convlog/tls/route-key.pem"', f'"{certs["server_key"]}"')
    cluster = cluster.replace('"/etc/convlog/tls/ca.pem"', f'"{certs["ca"]}"')
    assert "/etc/convlog" not in cluster and "tls {" in cluster, cluster
    return text + "\n" + cluster + "\n"


async def test_a_three_node_cluster_with_tls_routes_serves_the_signed_log(tmp_path: Path) -> None:
    # Step 1: three nodes from tls.conf's cluster block: TLS for clients and for routes.
    keys = tmp_path / "keys"
    make_keys(keys, ["Triage"])
    certs = _write_certs(trustme.CA(), tmp_path / "tls")
    route_ports = [free_port() for _ in range(3)]
    servers = []
    for i, port in enumerate(route_ports):
        d = tmp_path / f"n{i}"
        d.mkdir()
        shutil.copy(keys / "nats-users.conf", d / "nats-users.conf")
        servers.append(NatsServer(d, jetstream=False, config=_cluster_node_config(
            certs, d / "js", f"convlog-tls-{i}", route_ports, port)))
    tls_env = {"CONVLOG_TLS_CA": certs["ca"], "CONVLOG_TLS_CERT": certs["client"],
               "CONVLOG_TLS_KEY": certs["client_key"]}
    svc: LogService | None = None
    try:
        for s in servers:
            s.start()
        urls = [f"tls://127.0.0.1:{s.port}" for s in servers]
        log_env = {**tls_env, "CONVLOG_NKEY": str(keys / "log.nk"), "CONVLOG_SIGNING_KEY": str(keys / "log.nk")}

        # Step 2: once the routes (TLS) have elected a JetStream meta leader, the log service
        # starts with an R3 items stream.
        probe_nc = await nats.connect(urls, connect_timeout=2,  # its replies: _INBOX.<its key>.> only
                                      **load_settings({}, log_env).nats_options())
        try:
            await wait_jetstream_placement(probe_nc, 3, timeout=30)
        finally:
            await probe_nc.close()
        svc = LogService(load_settings(
            {"nats_url": ",".join(urls), "db": str(tmp_path / "convlog.db"), "stream_replicas": 3,
             "keyring": str(keys / "keyring.json"), "require_signatures": True}, log_env))
        await svc.start()
        info = await svc.nc.jetstream().stream_info("CONVLOG_ITEMS")
        assert info.config.num_replicas == 3

        # Step 3: a signed append through node 2 is read back through node 3: routes carry it.
        def client_settings(url: str, key: str) -> Any:
            return load_settings({"nats_url": url}, {**tls_env, "CONVLOG_NKEY": str(keys / key),
                                                    "CONVLOG_SIGNING_KEY": str(keys / key)})

        triage = await LogClient.connect(settings=client_settings(urls[1], "Triage.nk"), name="triage")
        reader = await LogClient.connect(settings=client_settings(urls[2], "gateway.nk"), name="reader")
        try:
            await triage.append("c1", [{"agent": "Triage", "data": {"role": "assistant", "content": "hi"}}])
            assert [e.data["content"] for e in await reader.items("c1")] == ["hi"]
        finally:
            await triage.close()
            await reader.close()

        # Step 4: the route port speaks TLS only: a plaintext peer gets no INFO, just a TLS
        # alert or a closed connection (the server logs a TLS route handshake error).
        reader_, writer = await asyncio.open_connection("127.0.0.1", route_ports[0])
        try:
            writer.write(b'CONNECT {"verbose":false}\r\nPING\r\n')
            await writer.drain()
            answer = await asyncio.wait_for(reader_.read(1024), 10)
            assert not answer.startswith(b"INFO") and b"PONG" not in answer, answer
        finally:
            writer.close()

        def refused_in_log() -> None:
            assert any("TLS route handshake error" in s.log_text() for s in servers)

        await assert_eventually(refused_in_log, timeout=10)
    finally:
        if svc is not None:
            await svc.shutdown()
        for s in servers:
            s.stop()
