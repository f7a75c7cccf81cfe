"""One publisher's appends reach the store in arrival order (``Endpoints``), also when
a plainly signed append, checked on the verifier threads, is followed by an unsigned one."""

from __future__ import annotations

from pathlib import Path

import msgspec
import nats
import pytest

from services.cli.main import main
from services.log.service import LogService
from shared.client import LogClient
from shared.config import load_settings
from shared.messages import AppendItem, AppendRequest
from shared.signing import Signer, sign_item
from shared.wire import publish_many
from tests.support.natsd import NatsServer


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("keys") / "keys"
    assert main(["keys", "init", "--out", str(out)]) == 0
    return out


async def test_a_signed_then_an_unsigned_append_keep_their_order(
    nats_server: NatsServer, tmp_path: Path, keys: Path
) -> None:
    settings = load_settings({"nats_url": nats_server.url, "db": str(tmp_path / "c.db"),
                              "keyring": str(keys / "keyring.json")}, {})
    service = LogService(settings)
    await service.start()
    nc = await nats.connect(nats_server.url)
    reader = await LogClient.connect(nats_server.url)
    try:
        triage = Signer.load(keys / "Triage.nk")
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox + ".*")
        bad = []
        for n in range(5):
            sid = f"order{n}"
            first = sign_item(triage, sid, AppendItem(agent="Triage", item_id="a", data={"n": 1}))
            second = AppendItem(agent="Triage", item_id="b", data={"n": 2})
            msgs = [(f"convlog.append.{sid}", f"{inbox}.{k}",
                     msgspec.json.encode(AppendRequest(items=[it])), None)
                    for k, it in enumerate((first, second))]
            assert await publish_many(nc, msgs) == []  # sent in this order, in one write
            for _ in range(2):
                await sub.next_msg(timeout=5)
            ids = [e.item_id for e in await reader.items(sid)]
            if ids != ["a", "b"]:
                bad.append((sid, ids))
        assert not bad, f"committed out of arrival order: {bad}"
    finally:
        await reader.close()
        await nc.close()
        await service.shutdown()
