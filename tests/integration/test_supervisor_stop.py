"""``Supervisor.stop``: the programs of one priority stop together, the tiers
one after another (workers, then the log service, then nats-server).

supervisord on its own stops one program at a time and sees each exit only at
its next one-second tick.  Here each program, once told to stop, waits for the
other programs of its tier to be told too, and checks that the tier above it
has already exited; a program that finds otherwise exits non-zero, which
supervisord's log records.  So on supervisord's own one-at-a-time stop the
first program of a tier would wait in vain and exit 3.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from services.cli.supervise import (
    Program,
    Supervisor,
    SupervisorError,
    _stop_settings,
    render_config,
    socket_path_for,
)
from tests.support.eventually import wait_until

#: On SIGTERM: mark it, wait (up to 8 s) for every program named in TIER to be
#: told too, check every program named in ABOVE has exited, mark the exit.
PROGRAM = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path

    marks, me = Path(sys.argv[1]), sys.argv[2]
    tier = [n for n in sys.argv[3].split(",") if n]
    above = [n for n in sys.argv[4].split(",") if n]

    def stop(signum, frame):
        (marks / f"{me}.told").touch()
        end = time.monotonic() + 8
        while not all((marks / f"{n}.told").exists() for n in tier):
            if time.monotonic() > end:
                os._exit(3)  # the rest of the tier was not told with it
            time.sleep(0.01)
        if not all((marks / f"{n}.gone").exists() for n in above):
            os._exit(4)  # told before the tier above had exited
        (marks / f"{me}.gone").touch()
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    while True:
        time.sleep(1)
    """
)


@pytest.mark.parametrize("grouped", [False, True], ids=["programs", "workers-group"])
def test_a_tier_stops_together_and_the_tiers_in_reverse_priority(short_tmp: Path, grouped: bool) -> None:
    marks, logs, run = short_tmp / "marks", short_tmp / "logs", short_tmp / "run"
    for d in (marks, logs, run):
        d.mkdir()
    script = short_tmp / "program.py"
    script.write_text(PROGRAM)
    workers = ["worker-a", "worker-b", "worker-c"]
    tiers = [(30, workers, []), (20, ["log"], workers), (10, ["nats"], ["log"])]
    programs = [
        Program(name, [sys.executable, str(script), str(marks), name, ",".join(tier), ",".join(above)],
                priority=priority, stopwaitsecs=12)
        for priority, tier, above in tiers
        for name in tier
    ]
    text = render_config(programs, run_dir=run, log_dir=logs)
    if grouped:  # as deploy/supervisord.conf has them: the group's priority is the tier's
        text = text.replace("priority=30", "priority=999") + f"\n[group:workers]\nprograms={','.join(workers)}\npriority=30\n"
    conf = short_tmp / "supervisord.conf"
    conf.write_text(text)
    sup = Supervisor(conf, socket_path_for(run), output=short_tmp / "supervisord.out")
    try:
        sup.start()

        def all_running() -> None:
            states = {i["name"]: i["statename"] for i in sup.processes()}
            assert states == dict.fromkeys([*workers, "log", "nats"], "RUNNING"), states

        wait_until(all_running, timeout=20)
    finally:
        rc = sup.stop()
    log = (logs / "supervisord.log").read_text()
    assert rc == 0, sup._output_tail()
    for name in [*workers, "log", "nats"]:
        assert f"stopped: {name} (exit status 0)" in log, log


def test_stopping_twice_and_after_supervisord_is_gone(short_tmp: Path) -> None:
    run, logs = short_tmp / "run", short_tmp / "logs"
    run.mkdir()
    logs.mkdir()
    conf = short_tmp / "supervisord.conf"
    sleeper = Program("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"], priority=10)
    conf.write_text(render_config([sleeper], run_dir=run, log_dir=logs))
    sup = Supervisor(conf, socket_path_for(run)).start()
    assert sup.stop() == 0
    assert sup.stop() == 0  # idempotent: nothing left to ask over the socket



def test_stop_settings_read_a_group_as_one_tier(tmp_path: Path) -> None:
    conf = tmp_path / "s.conf"
    conf.write_text(textwrap.dedent(
        """
        [program:nats]
        priority=10
        [program:w1]
        priority=999
        stopwaitsecs=15
        [program:w2]
        stopwaitsecs=25
        [program:odd]
        priority=soon
        [group:workers]
        programs=w1, w2
        priority=30
        """
    ))
    priority, stopwait = _stop_settings(conf)
    # supervisord reports grouped processes as workers:w1, workers:w2: the group's
    # priority orders them, and the tier waits as long as its slowest program may take
    assert priority == {"nats": 10, "odd": 999, "workers": 30}
    assert stopwait == {"nats": 10, "odd": 10, "workers": 25}


def test_convlog_up_names_a_program_supervisord_gave_up_on(short_tmp: Path) -> None:
    # supervisord stops restarting a program after its failed starts (FATAL) and never
    # starts it again; `convlog up` ran on and said nothing, so the stack looked up.
    from services.cli.stack_cmds import gave_up

    run, logs = short_tmp / "run", short_tmp / "logs"
    run.mkdir()
    logs.mkdir()
    conf = short_tmp / "supervisord.conf"
    programs = [Program("broken", [sys.executable, "-c", "raise SystemExit(2)"], priority=10),
                Program("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"], priority=20)]
    # One failed start is enough to give up here (convlog up allows several).
    conf.write_text(render_config(programs, run_dir=run, log_dir=logs).replace("startretries=10", "startretries=0"))
    sup = Supervisor(conf, socket_path_for(run)).start()
    try:
        said: set[str] = set()

        def fatal() -> list[str]:
            lines = gave_up(sup.processes(), said, sup.socket)
            assert lines, sup.processes()
            return lines

        (line,) = wait_until(fatal, timeout=20)
        assert line.startswith("convlog up: supervisord gave up on broken (") and str(logs / "broken.log") in line, line
        assert f"supervisorctl -s unix://{sup.socket} start broken" in line, line
        assert gave_up(sup.processes(), said, sup.socket) == []  # said once
    finally:
        sup.stop()


def test_start_does_not_take_another_supervisord_on_its_socket_for_its_own(short_tmp: Path) -> None:
    # start() returned once *a* supervisord answered RUNNING on the control socket: one
    # already serving it (another stack's) passed for the one just started, which was
    # about to exit (the socket taken), and a stop then stopped the other stack's programs.
    run, logs = short_tmp / "run", short_tmp / "logs"
    run.mkdir()
    logs.mkdir()
    conf = short_tmp / "supervisord.conf"
    sleeper = Program("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"], priority=10)
    conf.write_text(render_config([sleeper], run_dir=run, log_dir=logs))
    first = Supervisor(conf, socket_path_for(run)).start()
    try:
        second = Supervisor(conf, socket_path_for(run))
        with pytest.raises(SupervisorError):
            second.start(timeout=10)

        def untouched() -> None:  # the first stack's program runs on (once past its startsecs)
            states = {i["name"]: i["statename"] for i in first.processes()}
            assert states == {"sleeper": "RUNNING"}, states

        wait_until(untouched, timeout=20)
    finally:
        assert first.stop() == 0
