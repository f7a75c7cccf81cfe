"""The Agents SDK's ``OpenAIResponsesCompactionSession`` wrapped around a ``ConvlogSession``.

Real nats-server, real log service on SQLite, the SDK's own compaction session
and Runner; only the model is fake (``tests/support/fake_openai.py`` answers
``responses.compact`` as the real API does: the user messages, then one opaque
``compaction`` item).  What must hold: the model sees the compacted history,
while the log — ``convlog replay`` included — still shows every original item
under an intact hash chain (compaction = a clear and the new items).
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from agents import Agent, RunConfig, Runner, SessionSettings, handoff
from agents.memory import OpenAIResponsesCompactionSession
from openai import AsyncOpenAI

from shared import ConvlogSession
from shared.chain import verify
from shared.client import LogClient
from tests.support.fake_openai import FakeOpenAI, compacted_items, slow, text, tool_call
from tests.support.procs import REPO_ROOT
from tests.support.seed_agents import FakeServerProvider

SID = "compaction-audit"


def _texts(items: list[dict[str, Any]]) -> list[str]:
    out = []
    for item in items:
        content = item.get("content")
        if isinstance(content, str):
            out.append(content)
        elif isinstance(content, list):
            out.append("".join(p.get("text", "") for p in content if isinstance(p, dict)))
    return out


async def _replay(url: str, sid: str) -> tuple[int, str, str]:
    """``convlog replay SID --format jsonl --verify``: the real CLI, in its own process."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli.main", "replay", sid, "--format", "jsonl", "--verify",
        "--nats-url", url, cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_compaction_over_convlog_model_sees_summary_and_log_keeps_every_item(
    log_url: str, log_client: LogClient, fake_openai: FakeOpenAI
) -> None:
    run_config = RunConfig(model_provider=FakeServerProvider(fake_openai.base_url),
                           tracing_disabled=True)
    model_client = AsyncOpenAI(base_url=fake_openai.base_url, api_key="test-key", max_retries=0)
    underlying = ConvlogSession.from_url(SID, url=log_url)
    session = OpenAIResponsesCompactionSession(
        SID, underlying, client=model_client, model="gpt-4.1",
        # Compact as soon as two model-produced items are stored (the default waits for 10).
        should_trigger_compaction=lambda ctx: len(ctx["compaction_candidate_items"]) >= 2,
    )
    agent = Agent(name="Support", instructions="Help with billing.")
    fake_openai.script([text("Sorry, let me check the charges."), text("Refund issued."),
                        text("You're welcome!")])
    try:
        # 1. Two turns: after the second, two assistant items are stored -> compaction.
        await Runner.run(agent, "I was charged twice.", session=session, run_config=run_config)
        assert fake_openai.compactions == []
        await Runner.run(agent, "Please refund one.", session=session, run_config=run_config)
        assert len(fake_openai.compactions) == 1

        # 2. The session now holds what responses.compact returned: user messages + one summary.
        stored = await underlying.get_items()
        assert [i.get("type") for i in stored] == ["message", "message", "compaction"]
        assert _texts(stored[:2]) == ["I was charged twice.", "Please refund one."]
        assert _texts(compacted_items(stored[2])) == ["Sorry, let me check the charges.",
                                                      "Refund issued."]
        # ... and so does any other process reading the log (its own connection, no shared copy).
        other = ConvlogSession(SID, client=log_client)
        assert await other.get_items() == stored

        # 3. The next turn: the model sees the compacted history, not the original replies.
        await Runner.run(agent, "Thanks!", session=session, run_config=run_config)
        sent = fake_openai.requests[-1]["input"]
        assert [i.get("type") for i in sent[:3]] == ["message", "message", "compaction"]
        assert sent[2]["encrypted_content"] == stored[2]["encrypted_content"]
        assert not {"Sorry, let me check the charges.", "Refund issued."} & set(_texts(sent))
        assert _texts(sent)[-1] == "Thanks!"

        # 4. Audit: every original item is still in the log, in order, under an intact chain;
        #    the compaction is one clear followed by its items, in one append.
        raw = await log_client.items(SID, raw=True)
        assert verify(raw, session_id=SID) is None
        assert [e.item_order for e in raw] == list(range(1, len(raw) + 1))
        kinds = [e.kind for e in raw]
        assert kinds == ["item"] * 4 + ["clear"] + ["item"] * 3 + ["item"] * 2
        assert _texts([e.data for e in raw[:4]]) == [
            "I was charged twice.", "Sorry, let me check the charges.",
            "Please refund one.", "Refund issued.",
        ]
        assert raw[7].data["type"] == "compaction" and raw[4].agent == "system"
        call_keys = {e.item_id.rsplit(".", 1)[0] for e in raw[4:8]}
        assert len(call_keys) == 1  # the clear and the compacted items: one append
        code, out, err = await _replay(log_url, SID)
        assert code == 0, err
        replayed = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        assert [r["item_order"] for r in replayed] == [e.item_order for e in raw]
        assert [r["hash"] for r in replayed] == [e.hash for e in raw]
        assert "Refund issued." in out  # the hidden original reply is still readable
    finally:
        await underlying.close()
        await model_client.close()


async def test_compaction_through_clear_and_add_when_atomic_replace_is_not_used(
    log_url: str, log_client: LogClient, fake_openai: FakeOpenAI
) -> None:
    # A subclass that changes how items are added opts out of the one-append
    # replacement; the SDK then clears and adds through it.  Same audit result.
    class Tagged(ConvlogSession):
        async def add_items(self, items: list[Any], *, wrapper: Any = None) -> None:
            await super().add_items(items, wrapper=wrapper)

    sid = "compaction-fallback"
    underlying = Tagged.from_url(sid, url=log_url)
    model_client = AsyncOpenAI(base_url=fake_openai.base_url, api_key="test-key", max_retries=0)
    session = OpenAIResponsesCompactionSession(sid, underlying, client=model_client,
                                               model="gpt-4.1", compaction_mode="input")
    try:
        await underlying.add_items([
            {"role": "user", "content": "hello"},
            {"type": "message", "role": "assistant",
             "content": [{"type": "output_text", "text": "hi", "annotations": []}]},
        ])
        await session.run_compaction({"force": True})
        assert fake_openai.compactions[0]["input"][0]["content"] == "hello"
        stored = await underlying.get_items()
        assert [i.get("type") for i in stored] == ["message", "compaction"]
        raw = await log_client.items(sid, raw=True)
        assert [e.kind for e in raw] == ["item", "item", "clear", "item", "item"]
        assert raw[2].item_id.rsplit(".", 1)[0] != raw[3].item_id.rsplit(".", 1)[0]  # two appends
        assert verify(raw, session_id=sid) is None
    finally:
        await underlying.close()
        await model_client.close()


async def test_hooks_name_the_authors_through_the_compaction_session(
    log_url: str, log_client: LogClient, fake_openai: FakeOpenAI
) -> None:
    # The compaction session's add_items takes no wrapper, so the Runner passes
    # none through it: the authors must still be the agents the hooks named.
    sid = "compaction-authors"
    run_config = RunConfig(model_provider=FakeServerProvider(fake_openai.base_url),
                           tracing_disabled=True)
    model_client = AsyncOpenAI(base_url=fake_openai.base_url, api_key="test-key", max_retries=0)
    underlying = ConvlogSession.from_url(sid, url=log_url)
    session = OpenAIResponsesCompactionSession(sid, underlying, client=model_client, model="gpt-4.1",
                                               should_trigger_compaction=lambda ctx: False)
    billing = Agent(name="BillingAgent", instructions="Handle billing inquiries.")
    triage = Agent(name="TriageAgent", instructions="Hand off to the right specialist.",
                   handoffs=[handoff(billing, tool_name_override="transfer_to_billing")])
    fake_openai.script([tool_call("transfer_to_billing", {}), text("Billing here: refund issued.")])
    try:
        await Runner.run(triage, "I was charged twice", session=session, hooks=underlying.hooks(),
                         run_config=run_config)
        authored = [(e.agent, e.data.get("type") or e.data.get("role")) for e in await log_client.items(sid)]
        # README, "Who wrote each item": as without the compaction session.
        assert authored == [
            ("user", "user"),
            ("TriageAgent", "function_call"),
            ("TriageAgent", "function_call_output"),
            ("BillingAgent", "message"),
        ]
    finally:
        await underlying.close()
        await model_client.close()


async def _compaction_racing_another_writer(
    fake_openai: FakeOpenAI, store: Any, other: Any, sid: str
) -> list[dict[str, Any]]:
    """Two turns on ``store`` through the compaction session; while the second turn's
    ``responses.compact`` is in flight, ``other`` (another process's session on the same
    id) adds a user message.  Returns the visible history afterwards."""
    run_config = RunConfig(model_provider=FakeServerProvider(fake_openai.base_url),
                           tracing_disabled=True)
    model_client = AsyncOpenAI(base_url=fake_openai.base_url, api_key="test-key", max_retries=0)
    session = OpenAIResponsesCompactionSession(
        sid, store, client=model_client, model="gpt-4.1",
        should_trigger_compaction=lambda ctx: len(ctx["compaction_candidate_items"]) >= 2,
    )
    agent = Agent(name="Support", instructions="Help with billing.")
    fake_openai.script([text("Let me check."), text("Refund issued.")])
    try:
        await Runner.run(agent, "I was charged twice.", session=session, run_config=run_config)
        fake_openai.script_compact([slow(1.5)])
        turn = asyncio.create_task(
            Runner.run(agent, "Please refund one.", session=session, run_config=run_config))
        for _ in range(200):
            if fake_openai.compactions:
                break
            await asyncio.sleep(0.02)
        assert fake_openai.compactions, "the compaction never started"
        await other.add_items([{"role": "user", "content": "Also my address changed."}])
        await turn
        return await store.get_items()
    finally:
        await model_client.close()


async def test_sdk_sqlite_session_keeps_a_message_added_while_a_compaction_runs(
    fake_openai: FakeOpenAI, tmp_path: Any
) -> None:
    # The reference: the SDK's own store skips a replacement whose history changed.
    from agents import SQLiteSession

    sid = "compaction-race-sqlite"
    store = SQLiteSession(sid, str(tmp_path / "sdk.db"))
    other = SQLiteSession(sid, str(tmp_path / "sdk.db"))
    try:
        items = await _compaction_racing_another_writer(fake_openai, store, other, sid)
    finally:
        store.close()
        other.close()
    assert "Also my address changed." in _texts(items)


async def test_a_message_another_process_adds_while_a_compaction_runs_stays_visible(
    log_url: str, log_client: LogClient, fake_openai: FakeOpenAI
) -> None:
    # As with the SDK's SQLiteSession: the compaction's replacement must not hide a
    # message that landed after the compaction read the history (the model would
    # never see it again).
    sid = "compaction-race"
    store = ConvlogSession.from_url(sid, url=log_url)
    other = ConvlogSession(sid, client=log_client)  # its own connection: another process
    try:
        items = await _compaction_racing_another_writer(fake_openai, store, other, sid)
        assert "Also my address changed." in _texts(items)
        assert await other.get_items() == items
        raw = await log_client.items(sid, raw=True)
        assert verify(raw, session_id=sid) is None
    finally:
        await store.close()


async def _turns_with_a_limited_history(fake_openai: FakeOpenAI, store: Any, sid: str) -> list[Any]:
    """Four turns on a store whose ``session_settings.limit`` (4) hides older items from
    the model; compaction wanted after the fourth."""
    run_config = RunConfig(model_provider=FakeServerProvider(fake_openai.base_url),
                           tracing_disabled=True)
    model_client = AsyncOpenAI(base_url=fake_openai.base_url, api_key="test-key", max_retries=0)
    session = OpenAIResponsesCompactionSession(
        sid, store, client=model_client, model="gpt-4.1",
        should_trigger_compaction=lambda ctx: "Fourth?" in _texts(ctx["session_items"]),
    )
    agent = Agent(name="Support", instructions="Help with billing.")
    fake_openai.reset()
    fake_openai.script([text("One."), text("Two."), text("Three."), text("Four.")])
    try:
        for message in ("First?", "Second?", "Third?", "Fourth?"):
            await Runner.run(agent, message, session=session, run_config=run_config)
        return [(i.get("type"), _texts([i])) for i in await store.get_items(100)]
    finally:
        await model_client.close()


async def test_compaction_of_a_history_longer_than_the_session_limit_matches_the_sdk_sqlite_session(
    log_url: str, log_client: LogClient, fake_openai: FakeOpenAI, tmp_path: Any
) -> None:
    # The model sees only the last `limit` items; the SDK compacts that suffix and keeps
    # the older items (SQLiteSession), where ConvlogSession used to skip every compaction.
    from agents import SQLiteSession

    sid = "compaction-suffix"
    reference = SQLiteSession(sid, str(tmp_path / "sdk.db"), session_settings=SessionSettings(limit=4))
    try:
        expected = await _turns_with_a_limited_history(fake_openai, reference, sid)
    finally:
        reference.close()
    assert fake_openai.compactions and "compaction" in [t for t, _ in expected]
    store = ConvlogSession.from_url(sid, url=log_url, session_settings={"limit": 4})
    other = ConvlogSession(sid, client=log_client)  # another process, following live
    assert await other.get_items() == []
    try:
        got = await _turns_with_a_limited_history(fake_openai, store, sid)
        assert got == expected
        seen = await other.get_items()
        for _ in range(40):  # another process sees it once delivered (within max_staleness)
            if seen == await store.get_items(100):
                break
            await asyncio.sleep(0.05)
            seen = await other.get_items()
        assert seen == await store.get_items(100)
        raw = await log_client.items(sid, raw=True)
        assert verify(raw, session_id=sid) is None
        assert [e.kind for e in raw].count("retract") == 6  # the compacted suffix, hidden
        assert len([e for e in raw if e.kind == "item"]) == 8 + 4  # the originals are kept
    finally:
        await store.close()


async def test_the_sdk_encrypted_session_over_convlog_still_compacts(
    log_url: str, log_client: LogClient, fake_openai: FakeOpenAI
) -> None:
    # The SDK's EncryptedSession asks the store's snapshot with prune_prefix=...
    from agents.extensions.memory.encrypt_session import EncryptedSession

    sid = "compaction-encrypted"
    run_config = RunConfig(model_provider=FakeServerProvider(fake_openai.base_url),
                           tracing_disabled=True)
    model_client = AsyncOpenAI(base_url=fake_openai.base_url, api_key="test-key", max_retries=0)
    store = ConvlogSession.from_url(sid, url=log_url)
    compacting = OpenAIResponsesCompactionSession(
        sid, store, client=model_client, model="gpt-4.1",
        should_trigger_compaction=lambda ctx: len(ctx["compaction_candidate_items"]) >= 2,
    )
    session = EncryptedSession(sid, compacting, encryption_key="k" * 44)
    agent = Agent(name="Support", instructions="Help with billing.")
    fake_openai.script([text("One."), text("Two."), text("Three.")])
    try:
        for message in ("First?", "Second?", "Third?"):
            await Runner.run(agent, message, session=session, run_config=run_config)
        assert len(fake_openai.compactions) == 1
        items = await session.get_items()
        assert [i.get("type") for i in items][:3] == ["message", "message", "compaction"]
        assert _texts(items)[-2:] == ["Third?", "Three."]
        assert verify(await log_client.items(sid, raw=True), session_id=sid) is None
    finally:
        await store.close()
        await model_client.close()


async def test_the_compaction_snapshot_is_the_sdks_and_without_it_none(
    log_url: str, monkeypatch: Any
) -> None:
    # The SDK's _CompactionSnapshot is a private name (openai-agents <0.25), taken in one
    # place (shared.agents_sdk.compaction_snapshot_type); an SDK without it gets None, and
    # then reads the history through get_items, as for a store without the hook.
    from agents.memory.session import _CompactionSnapshot

    import shared.session_edits

    store = ConvlogSession.from_url("compaction-seam", url=log_url)
    try:
        await store.add_items([{"role": "user", "content": "hello"}])
        snapshot = await store._get_compaction_snapshot(10)
        assert isinstance(snapshot, _CompactionSnapshot)
        monkeypatch.setattr(shared.session_edits, "compaction_snapshot_type", lambda: None)
        assert await store._get_compaction_snapshot(10) is None
    finally:
        await store.close()
