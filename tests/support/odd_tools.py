"""Tools that misbehave, for tests of how a worker runs tools: each returns or raises
something ``run_tool`` must turn into a storable ``error:`` output, or hangs."""

import os


def tuple_keys(n: int) -> dict:
    """Counts by (row, col) pairs.

    Args:
        n: how many.
    """
    RUNS.append(n)
    return {(i, i): i for i in range(n)}


def file_name(n: int) -> str:
    """A file name as os.listdir gives one on a non-UTF-8 file system.

    Args:
        n: which.
    """
    RUNS.append(n)
    return os.fsdecode(b"report-\xff.txt")


RUNS: list[int] = []


async def cancelled_inside(n: int) -> str:
    """A tool whose own awaited future was cancelled by someone else (a closed client).

    Args:
        n: ignored.
    """
    RUNS.append(n)
    import asyncio

    fut = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_soon(fut.cancel)
    return await fut


def hangs(n: int) -> str:
    """A sync tool stuck on I/O with no timeout of its own.

    Args:
        n: seconds.
    """
    import time

    time.sleep(n)
    return "late"


def quick(n: int) -> str:
    """An instant sync tool.

    Args:
        n: echoed.
    """
    RUNS.append(n)
    return f"quick {n}"


def missing_file(n: int) -> str:
    """Fails naming a file as os.listdir gives one on a non-UTF-8 file system.

    Args:
        n: which.
    """
    RUNS.append(n)
    raise ValueError(f"cannot open {os.fsdecode(b'report-' + bytes([0xff]) + b'.txt')}")


def exits(n: int) -> str:
    """A sync tool that ends with SystemExit, as argparse does on arguments it refuses.

    Args:
        n: the exit status.
    """
    RUNS.append(n)
    raise SystemExit(n)


async def exits_async(n: int) -> str:
    """An async tool that ends with SystemExit.

    Args:
        n: the exit status.
    """
    RUNS.append(n)
    raise SystemExit(n)


class ApiError(Exception):
    """An error whose message is read from a response that may lack it."""

    def __init__(self, response: dict) -> None:
        super().__init__()
        self.response = response

    def __str__(self) -> str:
        return self.response["message"]


def fails_unprintably(n: int) -> str:
    """Raises an exception whose ``str()`` raises too.

    Args:
        n: which.
    """
    RUNS.append(n)
    raise ApiError({"status": 502})


async def gives_up_on_upstream(n: int) -> str:
    """A tool whose own request to a slow upstream times out (its own ``asyncio.timeout``,
    as an HTTP client's or a socket's timeout would), long before the worker's time limit.

    Args:
        n: seconds it waits for the upstream.
    """
    import asyncio

    async with asyncio.timeout(n):
        await asyncio.sleep(3600)
    return "answered"


async def retries_through_cancel(n: float) -> str:
    """An async tool that retries a slow request on any failure (a bare ``except:``), so
    a cancellation is taken for one more failure.

    Args:
        n: seconds it keeps retrying.
    """
    import asyncio
    import time

    end = time.monotonic() + n
    while time.monotonic() < end:
        try:
            await asyncio.sleep(0.05)
        except BaseException:  # noqa: BLE001 - the tool's own (bad) habit, under test
            pass
    return "late"


def interrupts(n: int) -> str:
    """A sync tool that raises KeyboardInterrupt of its own (a library's interactive
    prompt given no terminal, a retry helper that re-raises it).

    Args:
        n: ignored.
    """
    RUNS.append(n)
    raise KeyboardInterrupt


async def interrupts_async(n: int) -> str:
    """An async tool that raises KeyboardInterrupt of its own.

    Args:
        n: ignored.
    """
    RUNS.append(n)
    raise KeyboardInterrupt
