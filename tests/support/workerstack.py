"""Agent workers as real subprocesses next to a real log service, for worker tests.

A :class:`WorkerStack` is a nats-server (from the ``nats_server`` fixture),
the log service running in the test's event loop on a fresh SQLite file, a
:class:`~shared.client.LogClient`, and ``convlog worker`` processes talking to
the fake OpenAI server (or, with ``openai=False``, to the offline rules
model)::

    async with worker_stack(nats_server, tmp_path, fake_openai) as stack:
        await stack.start_workers(("Triage", spec), ("L1Billing", spec))
        ack = await stack.send("s1", "Hi")
        log = await stack.answered("s1")

Every worker is stopped by its PID when the stack closes (SIGTERM, then
SIGKILL).  Blocking waits run in threads: the log service shares the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client

from services.log.service import LogService
from services.worker.turn_ids import parse_turn_item_id, turn_key
from shared.client import LogClient
from shared.config import Settings, load_settings
from shared.messages import AppendReply, Envelope
from tests.support.eventually import assert_eventually
from tests.support.fake_openai import Entry, FakeOpenAI, text, tool_call
from tests.support.logsvc import service_env
from tests.support.natsd import NatsServer
from tests.support.procs import REPO_ROOT, Proc, offline_env, run_cli

__all__ = [
    "READY",
    "run_cli",
    "SEED_SPEC",
    "SOLO_SPEC",
    "WorkerStack",
    "agent_of",
    "is_user",
    "signed_worker",
    "signing_env",
    "solo_spec",
    "support_responder",
    "terminal_items",
    "turn_items",
    "user_texts",
    "worker_stack",
    "write_spec",
]

READY = r"worker \S+ ready"
SEED_SPEC = REPO_ROOT / "deploy" / "agents.toml"
_AGENT = re.compile(r"^You are ([A-Za-z0-9_-]+),")

#: a one-agent spec: ``Solo``, the entry agent, answers every message itself
SOLO_SPEC = """\
entry = "Solo"

[[agents]]
name = "Solo"
instructions = "Answer the user."
"""


def agent_of(request: dict[str, Any]) -> str:
    """The agent a model request is for (the first line of its system prompt)."""
    m = _AGENT.match(str(request["messages"][0]["content"]))
    assert m, request["messages"][0]
    return m.group(1)


def user_texts(request: dict[str, Any]) -> list[str]:
    """The user messages in a model request, in order."""
    return [str(m["content"]) for m in request["messages"] if m["role"] == "user"]


def is_user(env: Envelope) -> bool:
    return env.kind == "item" and env.agent == "user" and env.data.get("role") == "user"


def turn_items(log: Sequence[Envelope], user: Envelope) -> list[Envelope]:
    """Every item the turn of ``user`` wrote (turn-derived ids), in order."""
    key = turn_key(user.item_id)
    return [e for e in log if (t := parse_turn_item_id(e.item_id)) is not None and t.turn == key]


def terminal_items(log: Sequence[Envelope], user: Envelope) -> list[Envelope]:
    """The turn's reply / failure items: exactly one when the turn is done."""
    return [e for e in turn_items(log, user) if parse_turn_item_id(e.item_id).terminal]  # type: ignore[union-attr]


def support_responder(request: dict[str, Any]) -> Entry:
    """The seed's support scenario as a chat model: Triage routes to billing, L1Billing
    escalates refunds, everyone else answers ``"<agent> answers: <last user message>"``."""
    agent, last = agent_of(request), user_texts(request)[-1]
    if agent == "Triage":
        return tool_call("route_to_billing")
    if agent == "L1Billing" and "refund" in last.lower():
        return tool_call("escalate_to_senior")
    return text(f"{agent} answers: {last}")


def write_spec(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def solo_spec(path: Path, *, history_limit: int | None = None) -> Path:
    """Write :data:`SOLO_SPEC` (with ``history_limit`` if given) to ``path``."""
    return write_spec(path, SOLO_SPEC + ("" if history_limit is None else f"history_limit = {history_limit}\n"))


def signing_env(keys: Path, name: str, *, login: bool = False, require: bool = True) -> dict[str, str]:
    """The ``CONVLOG_*`` variables of a process that signs with ``keys/<name>.nk`` (made by
    ``convlog keys``) and checks signatures against ``keys/keyring.json``.

    ``login``: it also logs in to NATS with that key (``nats-users.conf``);
    ``require``: it refuses unsigned items.
    """
    seed = str(keys / f"{name}.nk")
    env = {"CONVLOG_SIGNING_KEY": seed, "CONVLOG_KEYRING": str(keys / "keyring.json")}
    if login:
        env["CONVLOG_NKEY"] = seed
    if require:
        env["CONVLOG_REQUIRE_SIGNATURES"] = "true"
    return env


def signed_worker(agent: str, *, keys: Path, url: str, log_dir: Path, env: Mapping[str, str] | None = None) -> Proc:
    """A ``convlog worker`` of the seed's spec (not started) on the offline rules model,
    logged in to NATS as its own key and signing with it, requiring signatures.

    ``env``: more variables for it (e.g. the TLS files); its data directory is ``log_dir``.
    """
    return Proc(
        [sys.executable, "-m", "services.cli.main", "worker", agent, "--agents", str(SEED_SPEC),
         "--nats-url", url, "--no-embedded"], log_dir=log_dir, name=f"worker-{agent}",
        env={**offline_env(), **(env or {}), **signing_env(keys, agent, login=True),
             "CONVLOG_DATA_DIR": str(log_dir)},
    )


@dataclass
class WorkerStack:
    server: NatsServer
    settings: Settings
    service: LogService
    nc: Client
    client: LogClient
    tmp: Path
    fake: FakeOpenAI | None
    procs: list[Proc] = field(default_factory=list)

    def worker(
        self,
        agent: str,
        spec: Path,
        *,
        openai: bool = True,
        ack_wait: float = 30.0,
        args: Sequence[str] = (),
        name: str | None = None,
        extra_env: Mapping[str, str] | None = None,
    ) -> Proc:
        """A ``convlog worker`` process (not started; stopped with the stack)."""
        env = {**service_env(self.tmp / "convlog-data"), **(extra_env or {})}
        env.pop("OPENAI_API_KEY", None)
        env.pop("OPENAI_BASE_URL", None)
        if openai:
            assert self.fake is not None
            env["OPENAI_API_KEY"] = "test"
            env["OPENAI_BASE_URL"] = self.fake.base_url
        cmd = [
            sys.executable, "-m", "services.cli.main", "worker", agent, "--agents", str(spec),
            "--nats-url", self.server.url, "--no-embedded", "--grace", "2",
            "--ack-wait", str(ack_wait), *args,
        ]
        proc = Proc(cmd, log_dir=self.tmp, env=env, name=name or f"worker-{agent}")
        self.procs.append(proc)
        return proc

    async def start_workers(self, *procs: Proc, timeout: float = 20.0) -> list[Proc]:  # noqa: ASYNC109
        """Start ``procs`` together and wait until each has bound its consumer."""
        for p in procs:
            p.start()
        await asyncio.gather(*(asyncio.to_thread(p.wait_for_line, READY, timeout) for p in procs))
        return list(procs)

    async def send(self, sid: str, text: str, *, to: str | None = None) -> AppendReply:
        return await self.client.send(sid, text, to=to)

    async def log(self, sid: str) -> list[Envelope]:
        return await self.client.items(sid, raw=True)

    async def answered(self, sid: str, *, users: int | None = None, timeout: float = 20.0) -> list[Envelope]:  # noqa: ASYNC109
        """Wait until every user message of ``sid`` (at least ``users`` of them) has a
        reply or failure item, and return the whole log."""

        async def check() -> list[Envelope]:
            log = await self.log(sid)
            asked = [e for e in log if is_user(e)]
            if users is not None:
                assert len(asked) >= users, f"{len(asked)} user messages so far"
            missing = [u.item_order for u in asked if not terminal_items(log, u)]
            assert not missing, f"user messages {missing} of {sid} not answered yet"
            return log

        return await assert_eventually(check, timeout=timeout, interval=0.1)

    async def requests_at_least(self, n: int, timeout: float = 10.0) -> list[Any]:  # noqa: ASYNC109
        assert self.fake is not None
        fake = self.fake

        def check() -> list[Any]:
            reqs = fake.requests
            assert len(reqs) >= n, f"{len(reqs)} model requests so far"
            return reqs

        return await assert_eventually(check, timeout=timeout)

    def outputs(self) -> str:
        return "\n".join(f"--- {p}\n{p.output()[-3000:]}" for p in self.procs)


@contextlib.asynccontextmanager
async def worker_stack(
    server: NatsServer, tmp: Path, fake: FakeOpenAI | None, *, nats_seam: str = "auto", store: str = "sqlite",
    **overrides: Any
) -> AsyncIterator[WorkerStack]:
    """``overrides`` are settings of the log service (e.g. ``metrics_port=0``)."""
    settings = load_settings(
        {"nats_url": server.url, "db": str(tmp / "log.db"), "data_dir": str(tmp), "nats_seam": nats_seam,
         "store": store, **overrides},
        environ={},
    )
    service = LogService(settings)
    await service.start()
    nc = await nats.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    stack = WorkerStack(server, settings, service, nc, LogClient(nc, timeout=5, deadline=20), tmp, fake)
    try:
        yield stack
    finally:
        await asyncio.gather(*(asyncio.to_thread(p.terminate, 8.0) for p in stack.procs))
        with contextlib.suppress(Exception):
            await nc.close()
        await service.shutdown()


@contextlib.asynccontextmanager
async def signed_solo_stack(server: NatsServer, tmp: Path, fake: FakeOpenAI) -> AsyncIterator[WorkerStack]:
    """A loose log service (checks the signatures it gets, requires none) and a running
    ``Solo`` worker that signs its items and checks signatures with ``tmp/keys``'s
    keyring; the fake model answers ``Solo answers: <last user text>``."""
    from services.cli.keys_cmds import make_keys

    keys = tmp / "keys"
    make_keys(keys, ["Solo"])
    fake.responder(lambda r: text(f"Solo answers: {user_texts(r)[-1]}"))
    async with worker_stack(server, tmp, fake, keyring=str(keys / "keyring.json")) as stack:
        spec = solo_spec(tmp / "solo.toml")
        await stack.start_workers(stack.worker("Solo", spec, extra_env=signing_env(keys, "Solo", require=False)))
        yield stack
