"""Regenerate the golden replay files in this directory.

    python tests/data/make_golden.py

Writes, with the real SQLite store (so the hashes are the ones convlog makes):

* ``golden.jsonl``  — the JSONL export of session ``golden-support-1``
  (a short billing conversation from the seed's support scenario);
* ``edited.jsonl``  — the same with the content of ``item_order`` 3 changed;
* ``removed.jsonl`` — the same with ``item_order`` 3 deleted;
* ``swapped.jsonl`` — the same with ``item_order`` 3 and 4 swapped.

The files are committed; tests only read them. Run this again only to change
the scenario (``created_at`` will differ, so every hash changes).
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path
from typing import Any

import msgspec

from services.log.store.sqlite import SQLiteStore
from shared.codec import encode_envelope_line
from shared.messages import AppendItem, AppendRequest, Envelope

SESSION_ID = "golden-support-1"
HERE = Path(__file__).resolve().parent

ITEMS: list[tuple[str, dict[str, Any]]] = [
    ("user", {"role": "user", "content": "Hi! My invoice shows a charge I don't recognise."}),
    ("Triage", {"type": "message", "role": "assistant", "status": "completed", "id": "msg_t1",
                "content": [{"type": "output_text", "annotations": [],
                             "text": "Sorry about that. What is the amount and the date of the charge?"}]}),
    ("user", {"role": "user", "content": "€42.50 on 3 March — reference ZX-9 ✓"}),
    ("Triage", {"type": "function_call", "call_id": "call_h1", "name": "transfer_to_billing",
                "arguments": "{}", "id": "fc_t1", "status": "completed"}),
    ("Triage", {"type": "function_call_output", "call_id": "call_h1",
                "output": "{\"assistant\": \"L1Billing\"}"}),
    ("L1Billing", {"type": "message", "role": "assistant", "status": "completed", "id": "msg_b1",
                   "content": [{"type": "output_text", "annotations": [],
                                "text": "I found the €42.50 charge from 3 March: it is a duplicate. "
                                        "I have refunded it 💶 — allow 3–5 days."}]}),
    ("user", {"role": "user", "content": "Thanks, that was quick! 🙏"}),
]


async def export() -> list[bytes]:
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteStore(Path(tmp) / "golden.db")
        await store.open()
        try:
            # One request per message, and the handoff turn (call, output,
            # reply of the new agent) as one batch, the way a worker writes it.
            for start, end in ((0, 1), (1, 2), (2, 3), (3, 6), (6, 7)):
                await store.append(SESSION_ID, AppendRequest(items=[
                    AppendItem(agent=agent, data=data, item_id=f"golden-{start + i + 1}")
                    for i, (agent, data) in enumerate(ITEMS[start:end])
                ]))
            page = await store.read(SESSION_ID, after=0, limit=1000, max_bytes=1 << 30)
            return [encode_envelope_line(msgspec.json.decode(raw, type=Envelope)) for raw in page.items]
        finally:
            await store.close()


def _edit_content(line: bytes) -> bytes:
    obj = json.loads(line)
    assert obj["item_order"] == 3
    obj["data"]["content"] = "€4250.00 on 3 March — reference ZX-9 ✓"
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def write(name: str, lines: list[bytes]) -> None:
    (HERE / name).write_bytes(b"".join(line + b"\n" for line in lines))


def main() -> None:
    lines = asyncio.run(export())
    write("golden.jsonl", lines)
    write("edited.jsonl", [*lines[:2], _edit_content(lines[2]), *lines[3:]])
    write("removed.jsonl", [*lines[:2], *lines[3:]])
    write("swapped.jsonl", [*lines[:2], lines[3], lines[2], *lines[4:]])
    print(f"wrote {len(lines)} envelopes of {SESSION_ID} and 3 tampered copies to {HERE}")


if __name__ == "__main__":
    main()
