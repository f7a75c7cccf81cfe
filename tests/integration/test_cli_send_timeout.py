"""``convlog send --timeout`` names the agent the turn waits for (found in a review).

A turn handed from Triage to L1Billing, whose worker is not running, timed out
with 124 and ``is a worker running for the session's active agent?``: the one
thing the user had to learn (which worker is missing) was not said, though send
had printed the handoff that decided it.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from tests.support.fake_openai import FakeOpenAI
from tests.support.procs import REPO_ROOT, service_env
from tests.support.workerstack import SEED_SPEC, WorkerStack, support_responder

EXIT_TIMEOUT = 124


async def _send(tmp: Path, url: str, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli.main", "send", *args,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**service_env(tmp / "cli"), "CONVLOG_NATS_URL": url}, cwd=REPO_ROOT)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_a_send_timing_out_names_the_agent_its_turn_waits_for(
    stack: WorkerStack, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    fake_openai.responder(support_responder)  # Triage hands every user to L1Billing
    await stack.start_workers(stack.worker("Triage", SEED_SPEC))  # and no L1Billing worker runs

    rc, out, err = await _send(tmp_path, stack.server.url, "handed", "I was charged twice", "--timeout", "3")
    assert rc == EXIT_TIMEOUT, err
    assert "handoff     -> L1Billing" in out, out  # what Triage did is printed
    said = err.strip().splitlines()[-1]
    assert "within 3s" in said and "L1Billing" in said and "#3" in said, said  # handed to it at #3

    # Nothing of the turn came: the agent --to named is the one waited for.
    rc, _, err = await _send(tmp_path, stack.server.url, "routed", "hello", "--to", "L2Support",
                             "--timeout", "1")
    assert rc == EXIT_TIMEOUT, err
    said = err.strip().splitlines()[-1]
    assert "within 1s" in said and "L2Support" in said, said


async def test_a_send_timing_out_does_not_name_a_to_the_session_did_not_use(
    stack: WorkerStack, tmp_path: Path
) -> None:
    """``--to`` picks the entry agent of a new session only; the log ignores it on
    a later message.  A later message sent with another ``--to`` timed out saying
    ``waiting for Triage: is a worker running for Triage?``, sending the user after
    a worker the turn never waited for."""
    rc, _, err = await _send(tmp_path, stack.server.url, "begun", "hello", "--to", "L2Support",
                             "--timeout", "1")
    assert rc == EXIT_TIMEOUT, err
    rc, _, err = await _send(tmp_path, stack.server.url, "begun", "again", "--to", "Triage",
                             "--timeout", "1")
    assert rc == EXIT_TIMEOUT, err
    said = err.strip().splitlines()[-1]
    assert "within 1s" in said and "#2" in said, said
    assert "Triage" not in said.split("(", 1)[1].split("--to")[0], said  # not the one waited for
    assert "the session's active agent" in said and "--to Triage" in said, said  # and says --to went unused
