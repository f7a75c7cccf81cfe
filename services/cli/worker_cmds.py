"""``convlog worker AGENT`` and ``convlog send SID TEXT``.

``worker`` is the entrypoint of one agent worker: it loads the agent spec,
reads ``OPENAI_API_KEY`` / ``OPENAI_BASE_URL`` (here and nowhere else), builds
the model client, installs the SIGTERM/SIGINT handlers and runs
:class:`~services.worker.worker.Worker` until it has shut down gracefully.

``send`` publishes a user message and prints every item of the turn it starts
(handoffs, tool calls, replies, with agent names) until the turn ends: the log
holds the turn's ``reply`` or ``fail`` item (turn-derived ids,
:mod:`services.worker.turn_ids`).  Exit 124 when it does not end in time.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import sys
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from shared.config import Settings
from shared.errors import UnavailableError

__all__ = ["default_agents_path", "register"]

log = logging.getLogger("convlog.worker")

EXIT_OK, EXIT_USAGE, EXIT_TIMEOUT = 0, 2, 124


def default_agents_path() -> Path:
    """The agents spec shipped in the package (the seed's support system)."""
    return Path(str(resources.files("services.cli").joinpath("data/agents.toml")))


def register(sub: Any, common: Callable[[argparse.ArgumentParser], None],
             commands: dict[str, Any]) -> None:
    p = sub.add_parser("worker", help="run the worker of one agent")
    common(p)
    p.add_argument("agent", metavar="AGENT", help="the agent to play, as named in the spec")
    p.add_argument("--agents", help="agents TOML [CONVLOG_AGENTS, default: the packaged "
                                    "seed support system]")
    p.add_argument("--concurrency", type=int, default=16,
                   help="most turns running at once (default 16)")
    p.add_argument("--ack-wait", type=float, default=30.0,
                   help="seconds before JetStream redelivers an unacked item (default 30)")
    p.add_argument("--grace", type=float, default=None,
                   help="seconds running turns get to finish on SIGTERM [CONVLOG_GRACE, default 10]")
    p.add_argument("--max-steps", type=int, default=10,
                   help="most model calls in one turn (default 10)")
    p.add_argument("--model-retries", type=int, default=4,
                   help="retries of a failed model call (default 4)")
    p.add_argument("--model-timeout", type=float, default=60.0,
                   help="seconds per model request (default 60)")
    commands["worker"] = cmd_worker

    p = sub.add_parser("send", help="send a user message and print the replies of its turn")
    common(p)
    p.add_argument("session_id", metavar="SID")
    p.add_argument("text", metavar="TEXT")
    p.add_argument("--to", metavar="AGENT", help="entry agent, when this starts the session")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds to wait for the turn to end (default 60; then exit 124)")
    commands["send"] = cmd_send


async def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    import nats.errors

    from services.worker.spec import SpecError, load_spec

    path = settings.agents or default_agents_path()
    try:
        spec = load_spec(path)
        spec.agent(args.agent)
    except SpecError as e:
        print(f"convlog worker: bad agent spec: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyError as e:
        print(f"convlog worker: {path}: {e.args[0]}", file=sys.stderr)
        return EXIT_USAGE
    for flag, value in (("--concurrency", args.concurrency), ("--max-steps", args.max_steps)):
        if value < 1:
            print(f"convlog worker: {flag} must be at least 1, got {value}", file=sys.stderr)
            return EXIT_USAGE
    if args.ack_wait <= 0 or args.model_timeout <= 0 or args.model_retries < 0:
        print("convlog worker: --ack-wait and --model-timeout must be positive, "
              "--model-retries non-negative", file=sys.stderr)
        return EXIT_USAGE
    if args.grace is not None:
        settings = dataclasses.replace(settings, grace=max(0.0, args.grace))

    # Imported only now: a bad spec is reported without loading the openai package.
    from services.worker.model import make_model_client
    from services.worker.rules_model import RULES_MODEL_NAME
    from services.worker.worker import Worker

    from .main import install_signal_handlers, require_nats

    # The only place the model credentials are read; everything below gets them passed.
    api_key = os.environ.get("OPENAI_API_KEY") or None
    base_url = os.environ.get("OPENAI_BASE_URL") or None
    model = make_model_client(api_key, base_url, max_retries=args.model_retries,
                              timeout=args.model_timeout)
    if api_key:
        log.info("model backend: OpenAI-compatible Chat Completions at %s (model %s)",
                 base_url or "https://api.openai.com/v1", spec.agent(args.agent).model)
    else:
        log.info("model backend: %s: built-in keyword rules for the seed scenario, NOT an LLM "
                 "(set OPENAI_API_KEY to use a real model)%s", RULES_MODEL_NAME,
                 "; OPENAI_BASE_URL is ignored without a key" if base_url else "")

    require_nats(settings)
    worker = Worker(
        settings, spec, args.agent, model,
        concurrency=args.concurrency, ack_wait=args.ack_wait, max_steps=args.max_steps,
    )
    _keep = install_signal_handlers(worker.shutdown)
    try:
        await worker.run()
    except BaseException as e:
        await worker.shutdown()
        if isinstance(e, (OSError, nats.errors.Error)) and worker.nc is None:
            raise UnavailableError(f"cannot connect to NATS at {settings.nats_url}: {e!r}") from e
        raise
    finally:
        del _keep
        await model.client.close()
    return EXIT_OK


async def cmd_send(args: argparse.Namespace, settings: Settings) -> int:
    from services.worker.turn_ids import parse_turn_item_id, turn_key
    from shared.client import new_item_id
    from shared.subjects import validate_session_id

    from .main import _client
    from .render import render_line

    validate_session_id(args.session_id)
    client = await _client(settings)
    try:
        item_id = new_item_id()
        turn = turn_key(item_id)
        ack = await client.send(args.session_id, args.text, to=args.to, item_id=item_id)
        user_order = ack.items[0].item_order
        print(f"sent #{user_order} to {args.session_id}", file=sys.stderr, flush=True)
        try:
            async with asyncio.timeout(args.timeout):
                async for env in client.follow(args.session_id, after=user_order, idle_check=1.0):
                    tid = parse_turn_item_id(env.item_id)
                    if tid is None or tid.turn != turn:
                        continue  # other turns of a busy session
                    print(render_line(env, width=0), flush=True)
                    if tid.terminal:
                        return EXIT_OK
        except TimeoutError:
            print(f"convlog send: the turn of #{user_order} did not end within "
                  f"{args.timeout:g}s (is a worker running for the session's active agent?)",
                  file=sys.stderr)
            return EXIT_TIMEOUT
    finally:
        await client.close()
    return EXIT_OK
