"""``convlog worker AGENT``.

``worker`` is the entrypoint of one agent worker: it loads the agent spec,
reads ``OPENAI_API_KEY`` / ``OPENAI_BASE_URL`` (here and nowhere else), builds
the model client, installs the SIGTERM/SIGINT handlers and runs
:class:`~services.worker.worker.Worker` until it has shut down gracefully.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import logging
import os
import time
from urllib.parse import urlparse

from shared.config import ConfigError, Settings
from shared.errors import BadRequestError, UnavailableError
from shared.failures import wait_for
from shared.startup import START_WAIT

from .common import (
    EXIT_OK,
    install_signal_handlers,
    non_negative_float,
    non_negative_int,
    packaged_agents_path,
    positive_float,
    positive_int,
    stopped_by_signals,
)

__all__ = ["START_WAIT", "check_worker_settings", "cmd_worker", "model_credentials", "wait_for_jetstream",
           "worker_arguments"]

log = logging.getLogger("convlog.worker")

_WAIT_LINE_EVERY = 10.0


async def wait_for_jetstream(settings: Settings, within: float, *, agent: str = "", who: str = "",
                             logger: logging.Logger = log) -> None:
    """Return once NATS answers at ``settings.nats_url`` with JetStream up
    (an account info request), trying again with backoff for up to
    ``within`` seconds: a worker (or ``who``: the log service) started with,
    or before, its servers (or a cluster still electing its leader) waits
    rather than exits.

    Raises:
        UnavailableError: still not up after ``within`` seconds.
        ConfigError: the server refused the credentials, or has no JetStream (waiting
            will not help).
    """
    import nats.errors
    import nats.js.errors

    from shared import nats_connect
    from shared.client import connect_options
    from shared.startup import require_jetstream

    who = who or f"worker {agent}"
    seen: list[Exception] = []  # nats-py's errors while connecting: the reason to give
    said: list[float] = []  # when each waiting line was written

    async def record(e: Exception) -> None:
        seen.append(e)

    def reason(e: BaseException) -> str:
        cause = seen[-1] if isinstance(e, nats.errors.NoServersError) and seen else e
        return f"{type(cause).__name__}: {cause}".rstrip(": ")

    async def probe() -> None:
        seen.clear()
        # One try per server in the URL (nats-py's own loop retries forever with
        # max_reconnect_attempts <= 0), and no line per failed try: ours says it.
        options = {**connect_options(settings, name=f"convlog-{who.replace(' ', '-')}-probe"),
                   "allow_reconnect": False, "max_reconnect_attempts": 1, "error_cb": record}
        nc = await nats_connect.connect(settings, options)
        try:
            await require_jetstream(nc, timeout=2)  # none at all: a configuration error, not a wait
        finally:
            await nc.close()

    def waiting(n: int, waited: float, failure: BaseException) -> None:
        if not said or waited - said[-1] >= _WAIT_LINE_EVERY:
            said.append(waited)
            logger.warning("%s: waiting for NATS JetStream at %s (%.0f of up to %g s): %s",
                           who, settings.nats_url, waited, within, reason(failure))

    down = (nats.errors.Error, nats.js.errors.Error, OSError, TimeoutError)
    started = time.monotonic()
    try:
        await wait_for(probe, within=within, waiting=waiting, heals=lambda e: isinstance(e, down))
    except down as e:
        raise UnavailableError(
            f"NATS JetStream did not answer at {settings.nats_url} within {within:g} s ({reason(e)}); "
            "start the stack with `convlog up` (or `convlog log`), or set CONVLOG_NATS_URL"
        ) from e
    if said:
        logger.warning("%s: NATS JetStream answers at %s (after %.1f s)", who,
                       settings.nats_url, time.monotonic() - started)


#: Most seconds of ``--ack-wait``: JetStream keeps it as a Go duration (int64 nanoseconds,
#: about 292 years at most) and refused a longer one only once the worker started.
ACK_WAIT_MAX = 86_400.0
#: Fewest seconds of ``--ack-wait``: a turn sends its in-progress acks at most every 0.2 s
#: (a third of the ack wait), so a shorter wait had every running turn redelivered.
ACK_WAIT_MIN = 1.0


def _ack_wait(text: str) -> float:
    value = positive_float(text)
    if not ACK_WAIT_MIN <= value <= ACK_WAIT_MAX:
        raise argparse.ArgumentTypeError(
            f"expected a number of seconds from {ACK_WAIT_MIN:g} to {ACK_WAIT_MAX:g}, got {text!r}")
    return value


def worker_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("agent", metavar="AGENT", help="the agent to play, as named in the spec")
    p.add_argument("--agents", help="agents TOML [CONVLOG_AGENTS, default: the packaged "
                                    "seed support system]")
    p.add_argument("--concurrency", type=positive_int, default=64, metavar="N",
                   help="most turns running at once (default 64)")
    p.add_argument("--ack-wait", type=_ack_wait, default=30.0, metavar="S",
                   help="seconds before JetStream redelivers an unacked item (default 30, from 1 to 86400)")
    p.add_argument("--grace", type=non_negative_float, default=None, metavar="S",
                   help="seconds running turns get to finish on SIGTERM [CONVLOG_GRACE, default 10]")
    p.add_argument("--max-steps", type=positive_int, default=10, metavar="N",
                   help="most model calls in one turn (default 10)")
    p.add_argument("--model-retries", type=non_negative_int, default=4, metavar="N",
                   help="retries of a failed model call (default 4)")
    p.add_argument("--model-timeout", type=positive_float, default=60.0, metavar="S",
                   help="seconds per model request (default 60)")
    p.add_argument("--publish-timings", action="store_true",
                   help="publish each turn part's per-phase timings on <prefix>.timings.turn "
                        "(read by convlog bench --turns)")
    p.add_argument("--start-wait", type=non_negative_float, default=START_WAIT, metavar="S",
                   help="seconds to wait for NATS JetStream at start, retrying with backoff, before "
                        f"exiting 3 (default {START_WAIT:g})")
    p.add_argument("--metrics-port", metavar="PORT", help="serve Prometheus /metrics here [CONVLOG_METRICS_PORT]")


def model_credentials() -> tuple[str | None, str | None]:
    """``OPENAI_API_KEY`` and ``OPENAI_BASE_URL`` (the only place they are read; what runs
    a worker gets them passed).

    Raises:
        ConfigError: a base URL that is not http(s) (with a key: without, it is ignored).
    """
    api_key = os.environ.get("OPENAI_API_KEY") or None
    base_url = os.environ.get("OPENAI_BASE_URL") or None
    if api_key and base_url:
        parsed = urlparse(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            # (httpx refused it only at each model call: every turn failed "Connection error.")
            raise ConfigError(f"OPENAI_BASE_URL={base_url!r} is invalid: expected an http:// or "
                              "https:// URL, e.g. http://127.0.0.1:8000/v1")
    return api_key, base_url


def check_worker_settings(settings: Settings) -> None:
    """What a worker refuses at its start, before it waits for NATS (``convlog up``
    asks too, rather than start workers that each exit 2 until supervisord gives up).

    Raises:
        ConfigError: signatures required without a keyring, or a bad model URL.
    """
    if settings.require_signatures and settings.keyring is None:
        # (Said only once NATS answered: with none, the worker waited out --start-wait, exit 3.)
        raise ConfigError("CONVLOG_REQUIRE_SIGNATURES needs CONVLOG_KEYRING (the public keyring file)")
    model_credentials()


async def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    import nats.errors

    from services.worker.spec import SpecError, load_spec

    path = settings.agents or packaged_agents_path()
    try:
        spec = load_spec(path)
        spec.agent(args.agent)
    except SpecError as e:
        raise BadRequestError(f"bad agent spec: {e}") from e
    except KeyError as e:
        raise BadRequestError(f"{path}: {e.args[0]}") from e
    check_worker_settings(settings)
    if args.grace is not None:
        settings = dataclasses.replace(settings, grace=args.grace)

    # Imported only now: a bad spec is reported without loading the openai package.
    from services import metrics
    from services.worker.model import make_model_client
    from services.worker.rules_model import RULES_MODEL_NAME
    from services.worker.worker import Worker

    api_key, base_url = model_credentials()
    model = make_model_client(api_key, base_url, max_retries=args.model_retries,
                              timeout=args.model_timeout)
    if api_key:
        log.info("model backend: OpenAI-compatible Chat Completions at %s (model %s)",
                 base_url or "https://api.openai.com/v1", spec.agent(args.agent).model)
    else:
        log.info("model backend: %s: built-in keyword rules for the seed scenario, NOT an LLM "
                 "(set OPENAI_API_KEY to use a real model)%s", RULES_MODEL_NAME,
                 "; OPENAI_BASE_URL is ignored without a key" if base_url else "")

    if await stopped_by_signals(wait_for_jetstream(settings, args.start_wait, agent=args.agent)):
        log.info("worker %s: stopped while starting", args.agent)
        return EXIT_OK
    worker = Worker(
        settings, spec, args.agent, model,
        concurrency=args.concurrency, ack_wait=args.ack_wait, max_steps=args.max_steps,
        publish_timings=args.publish_timings,
    )
    _keep = install_signal_handlers(worker.shutdown)
    server = metrics.serve(settings, metrics.WORKER_REGISTRY, f"worker {args.agent}")

    async def freeze_when_ready() -> None:
        # What exists once the worker is ready (the openai package's models, the spec,
        # the connection) lives as long as the process: keep it out of the cyclic GC,
        # so a full collection during turns scans only what came since (as `convlog log`).
        await worker.ready.wait()
        gc.freeze()

    _freeze = asyncio.create_task(freeze_when_ready())
    try:
        await worker.run()
    except BaseException as e:
        await worker.shutdown()
        if isinstance(e, (OSError, nats.errors.Error)) and worker.nc is None:
            raise UnavailableError(f"cannot connect to NATS at {settings.nats_url}: {e!r}") from e
        raise
    finally:
        _freeze.cancel()
        del _keep
        await model.client.close()
        metrics.close(server)
    return EXIT_OK
