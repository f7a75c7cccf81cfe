"""Play the seed's support conversation on one convlog session, as one OS process.

Several copies run at once on the same session id to show that ``ConvlogSession``
keeps one history across processes (``tests/integration/test_seed_examples.py``)::

    python -m tests.support.seed_conversation --nats-url nats://127.0.0.1:PORT \\
        --base-url http://127.0.0.1:PORT/v1 --session-id ticket-1 --tag p1 [--wait-go]

Each user message is prefixed with ``[<tag> m<i>]`` so the test can find every
item this process caused.  The agents are the seed's Triage → L1 → L2 system,
run by the real ``agents.Runner`` with ``SessionSettings(limit=50)`` and
``hooks=session.hooks()``; the model is the fake server at ``--base-url``.
Prints one JSON line per message (the agent that answered and its output) and
exits 0; any failure exits non-zero with a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from agents import RunConfig, Runner, SessionSettings

from shared import ConvlogSession
from tests.support.seed_agents import SUPPORT_MESSAGES, FakeServerProvider, build_support_system


async def play(args: argparse.Namespace) -> None:
    config = RunConfig(model_provider=FakeServerProvider(args.base_url), tracing_disabled=True)
    session = ConvlogSession.from_url(
        args.session_id, url=args.nats_url, session_settings=SessionSettings(limit=50)
    )
    agents = build_support_system()
    try:
        await session.ping()  # connect before the start line, so processes overlap
        if args.wait_go:
            print(json.dumps({"ready": args.tag}), flush=True)
            if (await asyncio.to_thread(sys.stdin.readline)).strip() != "go":
                raise SystemExit("stdin closed before 'go'")
        current = agents["triage"]
        for i, message in enumerate(SUPPORT_MESSAGES[: args.messages], start=1):
            said = f"[{args.tag} m{i}] {message}"
            result = await Runner.run(
                current, said, session=session, hooks=session.hooks(), run_config=config
            )
            current = result.last_agent
            line = {"tag": args.tag, "i": i, "agent": current.name, "output": result.final_output}
            print(json.dumps(line), flush=True)
    finally:
        await session.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nats-url", required=True)
    p.add_argument("--base-url", required=True, help="the fake OpenAI server, ending in /v1")
    p.add_argument("--session-id", required=True)
    p.add_argument("--tag", required=True, help="marks this process's user messages")
    p.add_argument("--wait-go", action="store_true",
                   help='print {"ready": TAG}, then wait for a line "go" on stdin')
    p.add_argument("--messages", type=int, default=len(SUPPORT_MESSAGES))
    asyncio.run(play(p.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
