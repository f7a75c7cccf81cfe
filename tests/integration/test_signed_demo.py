"""`convlog demo --signed`: the whole signed path with real processes -- every
worker signs with its own agent's key, the user gateway signs user messages,
the log service requires signatures and signs heads, replay verifies it all."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from services.cli.replay import envelopes_from_db
from shared.messages import Envelope
from shared.signing import Keyring

from .test_supervisor import stack_env


def test_signed_demo_every_item_is_signed_by_its_author(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "services.cli.main", "demo", "--signed", "--keep"],
                         capture_output=True, text=True, timeout=180, check=False, cwd=tmp_path,
                         env=stack_env())
    out = res.stdout
    kept = re.search(r"files and process logs kept in (\S+)", out)
    try:
        assert res.returncode == 0, out + res.stderr
        assert "10 signatures valid, 0 unsigned; signed head at item_order 10" in out
        assert "12 signatures valid, 0 unsigned; signed head at item_order 12" in out
        assert kept is not None
        work = Path(kept.group(1))
        ring = Keyring.load(work / "keys" / "keyring.json")
        envs = [e for e in envelopes_from_db(work / "data" / "convlog.db", "ticket-2026-0314-002")
                if isinstance(e, Envelope)]
        assert len(envs) == 12
        for env in envs:  # each author's own key (users: the gateway's)
            entry = ring.get(env.key_id or "")
            assert entry is not None and ring.check_envelope(env) is None
            assert entry.agent == env.agent or (entry.role == "agent" and env.agent == "system")
    finally:
        if kept is not None:
            shutil.rmtree(kept.group(1), ignore_errors=True)
