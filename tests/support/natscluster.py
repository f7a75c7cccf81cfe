"""A real ``nats-server`` JetStream cluster for tests (3 nodes by default), on 127.0.0.1.

Typical use::

    cluster = NatsCluster(tmp_path).start()
    try:
        await cluster.wait_ready()
        nc = await nats.connect(cluster.urls)
    finally:
        cluster.stop()

Each node is a :class:`~tests.support.natsd.NatsServer`: ephemeral client
ports, stopped by the PID we started.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Self

import nats
from nats.aio.client import Client
from nats.errors import Error as NatsError

from .eventually import assert_eventually
from .natsd import NatsServer, NatsServerError, free_port

__all__ = ["NatsCluster", "wait_jetstream_placement"]


class NatsCluster:
    """A JetStream cluster of ``size`` nodes (default 3) fully routed on 127.0.0.1.

    Route ports must be known before any node starts (each node lists the
    others), so they are picked by binding port 0; if another process grabs one
    in between, the whole cluster is torn down and started again on new ports.

    Args:
        tmp_dir: each node gets ``tmp_dir/n1``, ``tmp_dir/n2``, … as its ``tmp_dir``.
        size: number of nodes.
        name: ``--cluster_name``.
        extra_args: extra command line arguments for every node.
        tag_nodes: give each node its name as a server tag (``n1``, …), so a
            stream can be placed on one node (``placement: {"tags": ["n2"]}``).
        attempts: how many times to retry the start after a port race.
    """

    def __init__(
        self,
        tmp_dir: str | os.PathLike[str],
        *,
        size: int = 3,
        name: str = "convlog-test",
        extra_args: Sequence[str] = (),
        tag_nodes: bool = False,
        attempts: int = 3,
    ) -> None:
        self.tmp_dir = Path(tmp_dir)
        self.size = size
        self.name = name
        self.extra_args = tuple(extra_args)
        self.tag_nodes = tag_nodes
        self.attempts = attempts
        self.servers: list[NatsServer] = []

    @property
    def urls(self) -> list[str]:
        """Client URLs of every node, in node order."""
        return [server.url for server in self.servers]

    def start(self) -> Self:
        """Start every node; returns once each serves clients (see :meth:`wait_ready`).

        Raises:
            NatsServerError: the cluster did not start within ``attempts`` tries.
        """
        last: NatsServerError | None = None
        for _ in range(self.attempts):
            try:
                self._start_once()
                return self
            except NatsServerError as exc:  # most likely a route port race
                last = exc
                self.stop()
        raise NatsServerError(f"cluster failed to start after {self.attempts} attempts") from last

    def _start_once(self) -> None:
        ports = [free_port() for _ in range(self.size)]
        self.servers = [
            NatsServer(
                self.tmp_dir / f"n{i + 1}",
                name=f"n{i + 1}",
                cluster_name=self.name,
                cluster_port=port,
                routes=[f"nats://127.0.0.1:{p}" for p in ports if p != port],
                extra_args=self.extra_args,
                config=f'server_tags: ["n{i + 1}"]' if self.tag_nodes else None,
            )
            for i, port in enumerate(ports)
        ]
        # Launch all nodes before waiting on any: they bootstrap the meta group together.
        for server in self.servers:
            shutil.rmtree(server.store_dir, ignore_errors=True)  # left by a failed attempt
            server._spawn()
        for server in self.servers:
            server._port = server._wait_ready()

    async def wait_ready(self, timeout: float = 20.0) -> None:  # noqa: ASYNC109 - retry deadline
        """Wait until JetStream can place a stream on every node.

        Polls by creating (then deleting) a memory stream with
        ``num_replicas=size``: that succeeds only once a meta leader is elected
        and every peer is known to it.

        Raises:
            AssertionError: not ready within ``timeout`` seconds.
        """
        nc = await nats.connect(self.urls, connect_timeout=2, max_reconnect_attempts=-1)
        try:
            await wait_jetstream_placement(nc, self.size, timeout=timeout)
        finally:
            await nc.close()

    def stop(self) -> None:
        """Stop every node (SIGTERM, then SIGKILL), by PID. Idempotent."""
        for server in self.servers:
            server.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


async def wait_jetstream_placement(nc: Client, replicas: int, *, timeout: float = 20.0) -> None:  # noqa: ASYNC109
    """Wait until JetStream can place a stream of ``replicas`` replicas (a cluster
    has elected its meta leader and knows its peers): creates, then deletes, a
    memory stream until that succeeds.

    Raises:
        AssertionError: not ready within ``timeout`` seconds.
    """
    js = nc.jetstream(timeout=2)

    async def probe() -> None:
        try:
            await js.add_stream(
                name="_cluster_probe", subjects=["_cluster_probe"], num_replicas=replicas, storage="memory",
            )
            await js.delete_stream("_cluster_probe")
        except (NatsError, TimeoutError) as exc:
            raise AssertionError(f"JetStream cluster not ready: {exc!r}") from exc

    await assert_eventually(probe, timeout=timeout, interval=0.2)
