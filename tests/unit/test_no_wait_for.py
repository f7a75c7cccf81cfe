"""Product code bounds its waits with ``asyncio.timeout``, never ``asyncio.wait_for``.

On Python 3.11 (the oldest convlog supports) ``wait_for`` returns a result that
arrives in the same loop turn as a cancellation of its caller, and the
cancellation is lost: a SIGTERM to ``convlog demo`` went unnoticed that way, and
a shutdown that cancels a task inside such a wait can hang.  ``asyncio.timeout``
raises the cancellation (Python 3.12 rebuilt ``wait_for`` on it).
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_WAIT_FOR = re.compile(r"\basyncio\.wait_for\(|^\s*from asyncio import .*\bwait_for\b")


def test_product_code_does_not_use_asyncio_wait_for() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for top in ("services", "shared")
        for path in sorted((ROOT / top).rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if _WAIT_FOR.search(line)
    ]
    assert found == [], "use asyncio.timeout instead:\n" + "\n".join(found)
    assert _WAIT_FOR.search("    x = await asyncio.wait_for(fut, 1)")  # the pattern finds a use
    assert _WAIT_FOR.search("from asyncio import sleep, wait_for")
