"""One publisher's user messages to a session are committed in the order they were sent.

The first message of a session with ``to`` waits for its entry agent to be written
(a KV round trip) before it is appended: the messages sent right behind it wait for
it, instead of overtaking it ("second" was item 1 and "first" item 2).
"""

from __future__ import annotations

import json

from tests.support.logenv import Env, raw_log


async def test_messages_sent_behind_a_first_message_with_to_are_not_committed_before_it(env: Env) -> None:
    nc = env.nc
    inbox = nc.new_inbox()
    sub = await nc.subscribe(f"{inbox}.*")
    sent = ["first", "second", "third"]
    for n, text in enumerate(sent):  # back to back, as a gateway relays a user's typing
        body = {"content": text, "item_id": f"m-{n}", **({"to": "L1Billing"} if n == 0 else {})}
        await nc.publish("convlog.in.chat", json.dumps(body).encode(), reply=f"{inbox}.{n}")
    await nc.flush()
    acks = {}
    for _ in sent:
        msg = await sub.next_msg(timeout=5)
        acks[msg.subject.rpartition(".")[2]] = json.loads(msg.data)
    assert [acks[str(n)]["first_order"] for n in range(len(sent))] == [1, 2, 3], acks
    assert [e.data["content"] for e in await raw_log(env, "chat")] == sent
    kv = await nc.jetstream().key_value(env.settings.subjects.routing_bucket)
    assert json.loads((await kv.get("chat")).value)["entry"] == "L1Billing"
