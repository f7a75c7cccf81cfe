"""The README's "Running on a cluster" section, followed command by command.

The bash block is read from the README and each line run as a shell would:
``export`` sets the environment, ``VAR=value cmd`` sets it for one command,
a trailing ``&`` starts a background process (stopped by PID at the end),
anything else runs to completion and must exit 0.  Two things are changed,
and only these: every port of the deploy configs (client 4222-4224, routes
6222-6224) becomes a free one, in the configs and in the commands alike, and
the JetStream directories under ``/var/lib/convlog`` move to a temporary
directory (``sudo install -d`` becomes a ``mkdir``).  The monitoring port
lines are dropped.  Then: ``convlog send`` printed L1Billing's answer,
``convlog replay --verify`` said ``verified``, the log is an R3 stream, and two
log-service instances answered.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import nats

from services.bench.leader import store_streams
from tests.support.cluster_load import appends_served
from tests.support.natsd import free_port, nats_server_binary
from tests.support.procs import REPO_ROOT, Proc

README = (REPO_ROOT / "README.md").read_text()
DEPLOY_PORTS = [4222, 4223, 4224, 6222, 6223, 6224]


def section_commands() -> list[str]:
    section = README.split("\n## Running on a cluster\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S)
    assert block, "no bash block in 'Running on a cluster'"
    return [line.strip() for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]


def test_the_section_uses_the_deploy_configs_ports() -> None:
    text = " ".join(section_commands())
    for i in (1, 2, 3):
        conf = (REPO_ROOT / "deploy" / "nats" / f"cluster-{i}.conf").read_text()
        client = re.search(r"^listen:\s*127\.0\.0\.1:(\d+)", conf, re.M)
        assert client and f"127.0.0.1:{client.group(1)}" in text, f"cluster-{i}.conf's client port"
        assert f"deploy/nats/cluster-{i}.conf" in text


class Shell:
    """Runs the section's lines with the two changes the module docstring names."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.ports = {p: free_port() for p in DEPLOY_PORTS}
        self.var = tmp_path / "var-lib-convlog"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CONVLOG_")}
        self.env.pop("OPENAI_API_KEY", None)  # the offline rules model
        self.env["USER"] = self.env.get("USER", "convlog")
        self.background: list[Proc] = []
        self.outputs: list[tuple[str, str]] = []

    def remap(self, text: str) -> str:
        text = text.replace("/var/lib/convlog", str(self.var))
        for old, new in self.ports.items():
            text = text.replace(f"127.0.0.1:{old}", f"127.0.0.1:{new}")
        return text

    def config(self, path: str) -> str:
        text = self.remap((REPO_ROOT / path).read_text())
        text = re.sub(r"^http:.*$", "", text, flags=re.M)  # no monitoring port
        out = self.tmp / Path(path).name
        out.write_text(text)
        return str(out)

    def argv(self, words: list[str]) -> list[str]:
        if words[0] == "convlog":
            return [sys.executable, "-m", "services.cli.main", *words[1:]]
        if words[0] == "nats-server":
            rest = [self.config(w) if w.endswith(".conf") else w for w in words[1:]]
            return [nats_server_binary(), *rest]
        raise AssertionError(f"the section runs a command this test does not know: {words}")

    def run(self, line: str) -> None:
        words = shlex.split(self.remap(line))
        background = words[-1] == "&"
        words = words[:-1] if background else words
        env = dict(self.env)
        while words and re.match(r"^[A-Z_]+=", words[0]):  # VAR=value cmd
            key, _, value = words.pop(0).partition("=")
            env[key] = value
        if words[0] == "export":
            for word in words[1:]:
                key, _, value = word.partition("=")
                self.env[key] = value
            return
        if words[:3] == ["sudo", "install", "-d"]:  # the JetStream directories' parent
            Path(words[-1]).mkdir(parents=True, exist_ok=True)
            return
        if background:
            proc = Proc(self.argv(words), log_dir=self.tmp, env=env, name=words[0] + "-" + "-".join(words[1:3]))
            self.background.append(proc.start())
            return
        done = subprocess.run(self.argv(words), env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=120, check=False)
        output = done.stdout + done.stderr
        assert done.returncode == 0, f"{line!r} exited {done.returncode}:\n{output}\n{self.logs()}"
        self.outputs.append((line, output))

    def logs(self) -> str:
        return "\n".join(f"--- {p.log_path.name}\n{p.output()[-1500:]}" for p in self.background)

    def stop(self) -> None:
        for proc in reversed(self.background):
            proc.terminate()


async def test_running_on_a_cluster_as_the_readme_says(tmp_path: Path) -> None:
    shell = Shell(tmp_path)
    try:
        for line in section_commands():
            shell.run(line)
        (send_line, sent), (replay_line, replayed) = shell.outputs[-2:]
        assert send_line.startswith("convlog send") and replay_line.startswith("convlog replay")
        # The turn: the user's message, Triage's handoff, L1Billing's answer.
        assert "L1Billing" in sent and "Triage" in sent, sent
        assert re.search(r"^verified: cluster-1: \d+ items", replayed, re.M), replayed
        url = shell.env["CONVLOG_NATS_URL"]
        nc = await nats.connect(url.split(","), connect_timeout=2)
        try:
            streams = await store_streams(nc.jetstream(timeout=5), "convlog")
        finally:
            await nc.close()
        assert streams and all(s.replicas == 3 for s in streams), streams
        served = await appends_served(url)
        assert len(served) == 2, served
    finally:
        shell.stop()
