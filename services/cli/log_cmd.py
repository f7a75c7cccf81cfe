"""``convlog log``: the entrypoint of the log service.

Checks its storage first (:mod:`services.cli.storage`), starts the embedded
nats-server when none answers at a loopback URL (its JetStream store is
``DATA_DIR/jetstream``, the directory ``convlog up`` and ``deploy/`` use),
installs the signal handlers and runs :class:`LogService` until it has shut
down gracefully.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging

from shared.config import Settings
from shared.startup import START_WAIT

from .common import (
    EXIT_OK,
    install_signal_handlers,
    is_loopback,
    maybe_embedded_nats,
    non_negative_float,
    setting_source,
    stopped_by_signals,
)
from .storage import DatabaseInUseError, check_data_dir, check_service_db, db_in_use

__all__ = ["cmd_log", "log_arguments"]

log = logging.getLogger("convlog")


def log_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", metavar="PATH",
                   help="SQLite file [CONVLOG_DB, default DATA_DIR/convlog.db]; its directory "
                        "must exist")
    p.add_argument("--store", choices=["sqlite", "jetstream"],
                   help="where the log lives [CONVLOG_STORE, default sqlite]")
    p.add_argument("--keyring", help="public keyring: check signed appends [CONVLOG_KEYRING]")
    p.add_argument("--require-signatures", action="store_const", const=True,
                   help="refuse unsigned or foreign appends [CONVLOG_REQUIRE_SIGNATURES]")
    p.add_argument("--metrics-port", metavar="PORT", help="serve Prometheus /metrics here [CONVLOG_METRICS_PORT]")
    p.add_argument("--start-wait", type=non_negative_float, default=START_WAIT, metavar="S",
                   help="with no embedded server: seconds to wait for NATS JetStream at start, "
                        f"retrying with backoff, before exiting 3 (default {START_WAIT:g})")


def db_source(args: argparse.Namespace, settings: Settings) -> str | None:
    """The flag or variable that named the database, ``None`` for the default."""
    if getattr(args, "db", None):
        return "--db"
    return "CONVLOG_DB" if settings.db is not None else None


async def cmd_log(args: argparse.Namespace, settings: Settings) -> int:
    from services.log.authorize import authorizer_from, head_signer_from
    from services.log.service import LogService

    from .stack import nats_answers
    from .worker_cmds import wait_for_jetstream

    # The keyring the service checks signatures with, before anything starts;
    # a mistake names the flag or variable that was given.
    authorize = authorizer_from(settings, named=lambda name: setting_source(args, name))
    # Its own key too (the keyring's live log key): it was read only by the service's start,
    # once the embedded nats-server had been started.
    head_signer_from(settings, authorize.keyring)
    if settings.store == "sqlite":
        check_service_db(settings.db_path, name=db_source(args, settings),
                         data_dir_name=setting_source(args, "data_dir"))
        if db_in_use(settings.db_path):  # one runs: not "unavailable" (exit 3), and no wait for NATS
            raise DatabaseInUseError(f"a log service already holds {settings.db_path}; stop it first")
    if settings.embedded:  # the embedded server's JetStream store lives there
        check_data_dir(settings.data_dir, name=setting_source(args, "data_dir"))
    own = settings.embedded and is_loopback(settings.nats_url)
    if args.start_wait and (not own or nats_answers(settings.nats_url)):
        # No server of its own: one started with it (a Procfile, a cluster) is waited
        # for, as a worker does, rather than exiting 3 at once.  So is one that already
        # answers at a loopback URL: something there that is not NATS (another program's
        # port) hung the start with no word, and a server without JetStream was named only
        # once the database had been created.
        if await stopped_by_signals(wait_for_jetstream(settings, args.start_wait, who="log service", logger=log)):
            log.info("log service: stopped while starting")
            return EXIT_OK
    service = LogService(settings, authorize=authorize)
    # Before the embedded server starts (in a thread, so the loop hears signals
    # meanwhile): a signal then shuts the service down before it starts, and the
    # server is stopped below (Python's default ended the process at once, and a
    # second Ctrl-C interrupted the start: either left that nats-server running).
    _keep = install_signal_handlers(service.shutdown)
    server = await asyncio.to_thread(maybe_embedded_nats, settings, settings.data_dir)
    if server is not None:
        log.info("started embedded nats-server at %s (JetStream store %s)", server.url,
                 server.data_dir / "jetstream")
    try:
        await service.start()
        # What exists now lives as long as the process: keep it out of the
        # cyclic GC, so a full collection under load scans only what came
        # since (one had paused appends for 10-25 ms).
        gc.freeze()
        await service.run()
    except BaseException:
        await service.shutdown()
        raise
    finally:
        if server is not None:
            server.stop()
    del _keep
    return EXIT_OK
