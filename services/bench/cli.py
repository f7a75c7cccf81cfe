"""``convlog bench``: its arguments, and the dispatch to one of the benches.

* default: the log service's appends and reads (:mod:`services.bench.appends`);
* ``--turns``: convlog's own cost per agent turn (:mod:`services.bench.turns`);
* ``--sdk``: ``ConvlogSession`` next to the Agents SDK's ``SQLiteSession``
  (:mod:`services.bench.sdk`);
* ``--signed``: signed vs unsigned appends in the same run (:mod:`services.bench.signed`);
* ``--store jetstream --fault leader-kill``: the unavailability window after a
  stream leader dies on a 3-node cluster (:mod:`services.bench.leader_kill`).

The benches are imported only when they run, so ``convlog --help`` stays light.
"""

from __future__ import annotations

import argparse
import json
import sys

from services.cli.common import EXIT_OK, cancelled_by_signals, positive_float, positive_int
from services.cli.stack import nats_answers
from shared.config import Settings
from shared.errors import BadRequestError

from .measure import losses_exit_code, say, to_json

__all__ = ["bench_arguments", "cmd_bench"]

SDK_PROCESSES = 4  # services.bench.sdk.PROCESSES: --sdk-ops must give each one a call


def _levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated counts, got {text!r}") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"every level must be at least 1, got {text!r}")
    return levels


def _cases(text: str) -> list[str]:
    from .stores import CASES

    known = [c.key for c in CASES]
    keys = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in keys if k not in known]
    if not keys or unknown:
        raise argparse.ArgumentTypeError(f"unknown case(s) {unknown or text!r}; known: {', '.join(known)}")
    return keys


def _sdk_ops(text: str) -> int:
    n = positive_int(text)
    if n < SDK_PROCESSES:
        raise argparse.ArgumentTypeError(f"expected at least {SDK_PROCESSES}, got {text!r}")
    return int(n)


def bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--writers", type=positive_int, default=None, metavar="N",
                   help="concurrent writers (default 64; 16 with --fault)")
    p.add_argument("--sessions", type=positive_int, default=None, metavar="N",
                   help="sessions written to (default 100; 20 with --fault)")
    p.add_argument("--item-size", type=positive_int, default=200, metavar="BYTES",
                   help="content bytes per item (default 200)")
    p.add_argument("--duration", type=positive_float, default=10.0, metavar="S",
                   help="seconds per phase (default 10)")
    p.add_argument("--replay-items", type=positive_int, default=100_000, metavar="N",
                   help="items in the session replayed (default 100000)")
    p.add_argument("--long-session", type=positive_int, default=0, metavar="N",
                   help="also compare append cost at 1k items and at this many (e.g. 1000000)")
    p.add_argument("--store", choices=["sqlite", "jetstream"], default=None,
                   help="instead: private stacks fsyncing every write; jetstream runs the JetStream "
                        "store, then SQLite, next to a raw JetStream publish baseline")
    p.add_argument("--cases", type=_cases, default=None, metavar="KEY,KEY,...",
                   help="with --store: measure only these cases (raw R1, the ratios' baseline, always "
                        "runs): raw, raw_r3, sqlite, jetstream_r1, jetstream_r1_2shards, jetstream_r3, "
                        "jetstream_r3_2shards")
    p.add_argument("--json", action="store_true", help="print the figures as JSON (every bench)")
    p.add_argument("--fault", choices=["leader-kill"], default=None,
                   help="with --store jetstream: on a private 3-node cluster (R3, two log services), "
                        "kill -9 the stream leader each round and report how long appends stopped")
    p.add_argument("--sdk", action="store_true",
                   help="instead: ConvlogSession vs the Agents SDK's SQLiteSession "
                        "(needs convlog[agents])")
    p.add_argument("--sdk-ops", type=_sdk_ops, default=1000, metavar="N",
                   help="with --sdk: calls per scenario (default 1000)")
    p.add_argument("--signed", action="store_true",
                   help="instead: signed vs unsigned appends in the same run, on a private stack")
    p.add_argument("--turns", action="store_true",
                   help="instead: convlog's overhead per agent turn, on a private stack with "
                        "2 workers")
    p.add_argument("--levels", type=_levels, default=[1, 8, 32, 128], metavar="N,N,...",
                   help="with --turns: concurrent sessions per phase (default 1,8,32,128)")
    p.add_argument("--turn-rate", type=positive_float, default=None, metavar="N",
                   help="with --turns: turns a second offered in the open-loop phase (default: half "
                        "the closed loop's rate at the largest --levels, measured in the same run)")
    p.add_argument("--metrics-cost", action="store_true",
                   help="instead: appends/s and log-service CPU with metrics off vs on, "
                        "alternating --rounds times")
    p.add_argument("--rounds", type=positive_int, default=3, metavar="N",
                   help="with --metrics-cost or --fault: rounds (default 3)")


async def cmd_bench(args: argparse.Namespace, settings: Settings) -> int:
    # SIGTERM/SIGHUP: the bench's `finally`s stop the private stack it started and
    # remove its temporary directory.
    return await cancelled_by_signals(_bench(args, settings))


async def _bench(args: argparse.Namespace, settings: Settings) -> int:
    modes = [flag for flag, on in (("--turns", args.turns), ("--sdk", args.sdk), ("--signed", args.signed),
                                   ("--metrics-cost", args.metrics_cost), ("--store", args.store is not None))
             if on]
    if len(modes) > 1:  # each runs instead of the others: one would be ignored
        raise BadRequestError(f"{' and '.join(modes)} are different benches: pick one")
    if args.cases is not None and args.store is None:
        raise BadRequestError("--cases picks the cases of --store jetstream|sqlite: add --store")
    if args.store == "sqlite" and args.cases is not None and (other := sorted(set(args.cases) - {"raw", "sqlite"})):
        raise BadRequestError(f"--store sqlite runs raw and sqlite only, not {', '.join(other)}: "
                              "use --store jetstream")
    if args.fault is not None and args.store != "jetstream":
        raise BadRequestError("--fault runs on the JetStream store: add --store jetstream")
    fault = args.fault is not None
    args.writers = args.writers or (16 if fault else 64)
    args.sessions = args.sessions or (20 if fault else 100)
    if fault:
        from .leader_kill import render, run_leader_kill

        result = await run_leader_kill(args)
        print(json.dumps(result, indent=2) if args.json else render(result))
        return losses_exit_code({k: result[k] for k in ("lost", "duplicated", "moved", "sessions_not_verified")})
    if args.signed:
        from .signed import run_signed_bench

        print(await run_signed_bench(args))
        return EXIT_OK
    if args.turns:
        from .turns import cmd_turn_bench

        return await cmd_turn_bench(args)
    if args.metrics_cost:
        from .metrics_cost import run_metrics_cost

        print(await run_metrics_cost(args))
        return EXIT_OK
    if args.sdk:
        from .sdk import run_sdk_bench

        url = settings.nats_url if args.nats_url and nats_answers(settings.nats_url) else None
        if args.nats_url and url is None:  # as the appends bench says it
            say(f"nothing answers at {settings.nats_url}: starting a private stack "
                "(embedded nats-server + convlog log)")
        results = await run_sdk_bench(url, args.sdk_ops, sys.stdout, as_json_out=args.json, settings=settings)
        mixing = results["convlog"]["processes"]  # convlog's side: SQLiteSession's are the SDK's
        return losses_exit_code({k: getattr(mixing, k) for k in ("lost", "doubled", "out_of_order", "torn")})

    if args.store is not None:
        from .stores import cmd_store_bench

        return await cmd_store_bench(args)
    from .appends import report, run_bench
    from .stack import local_stack

    if args.nats_url and nats_answers(settings.nats_url):
        results = await run_bench(args, settings.nats_url, settings=settings)
    else:
        why = f"nothing answers at {settings.nats_url}" if args.nats_url else "no --nats-url given"
        say(f"{why}: starting a private stack (embedded nats-server + convlog log)")
        with local_stack() as url:
            results = await run_bench(args, url)
    if args.json:
        print(to_json("appends", results, writers=args.writers, sessions=args.sessions,
                      item_size=args.item_size, duration_s=args.duration))
    else:
        print(report(results, args))
    return EXIT_OK
