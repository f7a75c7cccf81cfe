"""The README's Agents SDK example runs as written, against a real log service
(the model is the fake OpenAI-compatible server), and its log verifies."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

from services.log.service import LogService
from shared.client import LogClient
from shared.config import load_settings
from tests.support.fake_openai import FakeOpenAI, text, tool_call
from tests.support.natsd import NatsServer

ROOT = Path(__file__).resolve().parents[2]
SESSION = "ticket-2026-0314-001"


def _support_py() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Use with the OpenAI Agents SDK", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "the SDK section has no python example"
    return blocks[0]


async def test_the_readme_sdk_example_runs_and_its_log_verifies(
    nats_server: NatsServer, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    script = tmp_path / "support.py"
    script.write_text(_support_py())
    # Message 1: Triage hands off to billing, billing answers.  Message 2:
    # billing escalates, senior support answers.
    fake_openai.script([
        tool_call("route_to_billing", {}), text("I can see the double charge."),
        tool_call("escalate_to_senior", {}), text("Refund issued for the duplicate charge."),
    ])
    db = tmp_path / "convlog.db"
    settings = load_settings({"nats_url": nats_server.url, "db": str(db)}, {})
    async with LogService(settings):
        env = {**os.environ, "CONVLOG_NATS_URL": nats_server.url, "OPENAI_API_KEY": "test",
               "OPENAI_BASE_URL": fake_openai.base_url, "PYTHONPATH": str(ROOT)}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(script), env=env, cwd=tmp_path,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 120)
        text_out = out.decode()
        assert proc.returncode == 0, text_out
        assert "L2Support: Refund issued for the duplicate charge." in text_out

        async with await LogClient.connect(nats_server.url) as client:
            items = await client.items(SESSION)
        agents = [e.agent for e in items]
        assert agents[0] == "user" and "Triage" in agents and "L2Support" in agents

    replay = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli.main", "replay", SESSION, "--db", str(db), "--verify",
        "--quiet", cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(replay.communicate(), 60)
    assert replay.returncode == 0, err.decode()
    assert f"verified: {SESSION}: {len(items)} items" in err.decode()
