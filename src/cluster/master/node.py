"""A whole master in one object: log, planner, requests, control socket, HTTP API.

`cluster master` is this plus what only a command line needs (flags and config files, the
`master.addr` / `http.url` files other processes read, signals). A program that embeds the
master builds a `MasterNode` directly (docs/embedding.md):

    node = MasterNode(data_dir, Membership(secret=secret), MasterNodeConfig(...))
    try:
        started = await task_group.start(node.run)   # started.addrs: where workers dial
        reply = await node.request(SessionCreate(slots=2, memory_per_slot_mb=4096))
        ...
        node.stop()
    finally:
        node.close()
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskStatus

from cluster import control
from cluster.control import Reply, Request
from cluster.datadir import DataDirLock, hold
from cluster.master.config import PlannerConfig
from cluster.master.http_api import HttpApi, HttpApiConfig, check_config
from cluster.master.maintenance import on_reconnect
from cluster.master.planner import Planner
from cluster.master.server import Master, MasterConfig
from cluster.master.service import MasterService
from cluster.master.settings import settings_warnings
from cluster.net.identity import load_identity
from cluster.net.membership import Membership
from cluster.shared.events import Event
from cluster.shared.maintenance_policy import DEFAULT_POLICY, MaintenancePolicy
from cluster.shared.state import State
from cluster.shared.store import EventStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MasterNodeConfig:
    #: libp2p multiaddrs to listen on (port 0: any free port; `Started.addrs` says which).
    listen: Sequence[str] = ("/ip4/127.0.0.1/tcp/0",)
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    policy: MaintenancePolicy = DEFAULT_POLICY
    #: A peer silent this long on a stream that expects traffic is considered hung.
    peer_timeout: float = 10.0
    #: What one member may have logged: bytes/s sustained, and its burst (see
    #: `MasterConfig.member_log_bytes_per_s`); beyond, its submissions are read more slowly.
    member_log_bytes_per_s: int = 1 << 20
    member_log_burst_bytes: int = 64 << 20
    #: Events between state snapshots in the data directory.
    snapshot_every: int = 100_000
    #: Serve the local operator's control socket (`cluster session ...` on this host).
    control_socket: bool = True
    #: The read-only HTTP API and dashboard; None: not served.
    http: HttpApiConfig | None = None


@dataclass(frozen=True)
class Started:
    """What `MasterNode.run` reports once it serves."""

    #: Full libp2p addresses (with /p2p/<master id>) workers can dial.
    addrs: list[str]
    #: The HTTP API's port (None when not served).
    http_port: int | None


class MasterNode:
    """The master process's parts, wired as `cluster master` wires them.

    Opening locks `data_dir` (`cluster.datadir.hold`: `DataDirInUseError` if another master
    or worker holds it, `DataDirError` if it is a worker's), then reads the log (and newest
    snapshot) there and the master's key; `close()` closes the log and releases the lock. In
    between, `run()` serves until `stop()`.
    """

    def __init__(
        self,
        data_dir: Path,
        membership: Membership,
        config: MasterNodeConfig | None = None,
        *,
        dir_lock: DataDirLock | None = None,
    ) -> None:
        """`dir_lock`: the lock on `data_dir` when the caller took it itself (`cluster master`
        does, before it writes `cluster.secret` there); the node owns it from then on, and
        releases it on `close()` or when this raises."""
        self.data_dir = data_dir
        self.config = config = config or MasterNodeConfig()
        if dir_lock is not None and not (dir_lock.held and dir_lock.data_dir == data_dir):
            dir_lock.release()
            raise ValueError(f"dir_lock must be a held lock of {data_dir}")
        # First, before the key and the log are made: no other process creates its files
        # here meanwhile, and a worker's directory is not a master's.
        self._dir_lock = dir_lock if dir_lock is not None else hold(data_dir, "master")
        try:
            key_pair, self.node_id = load_identity(data_dir)
            self.store = EventStore.open(data_dir, snapshot_every=config.snapshot_every)
            try:
                self._build(data_dir, key_pair, membership, config)
            except BaseException:
                self.store.close()  # the log is open (and locked): a bad setting must not keep it
                raise
        except BaseException:
            self._dir_lock.release()
            raise

    def _build(
        self, data_dir: Path, key_pair: Any, membership: Membership, config: MasterNodeConfig
    ) -> None:
        if config.http is not None:
            check_config(config.http)  # a token off loopback, etc.: refused before serving
        for warning in settings_warnings(config.planner, config.policy):
            log.warning("%s", warning)
        shell = MasterConfig(
            listen=list(config.listen),
            # One source for the cycle: the planner's rules and the loop that runs them.
            plan_interval=config.planner.plan_interval_ms / 1000,
            peer_timeout=config.peer_timeout,
            member_log_bytes_per_s=config.member_log_bytes_per_s,
            member_log_burst_bytes=config.member_log_burst_bytes,
            data_dir=data_dir,
        )
        # Fresh randomness for each epoch's seed comes from the master and travels in the log.
        planner = Planner(
            config.planner, policy=config.policy, entropy=lambda: secrets.randbits(63)
        )
        self.master = Master(
            self.store, key_pair, membership, shell, planner=planner, connect_hook=_reconnected
        )
        self.service = MasterService(self.master, config.policy)
        self.master.request_handler = self.service.handle_forwarded

    @property
    def state(self) -> State:
        return self.master.state

    async def run(self, *, task_status: TaskStatus[Started] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve until `stop()`. Raises `HttpApiConfigError` if the HTTP port cannot be had."""
        async with anyio.create_task_group() as tg:
            addrs = await tg.start(self.master.run)
            if self.config.control_socket:
                await tg.start(control.serve, self.data_dir, self.service.handle_local)
            http_port = None
            if self.config.http is not None:
                http_port = await tg.start(self.http_api(self.config.http).serve)
            task_status.started(Started(addrs=addrs, http_port=http_port))
            await self.master.wait_finished()
            tg.cancel_scope.cancel()

    def http_api(self, config: HttpApiConfig | None = None) -> HttpApi:
        """The read-only HTTP API over this master, as `run` serves it when
        `MasterNodeConfig.http` is set: for a program that serves it in its own task group,
        ``port = await task_group.start(node.http_api(HttpApiConfig(...)).serve)``. It reads
        the master's state and log, and its credit figures start from this node's policy."""
        config = config if config is not None else HttpApiConfig()
        return HttpApi(self.master, config, initial_credit_ms=self.config.policy.initial_credit_ms)

    async def request(self, request: Request) -> Reply:
        """Decide a request as the local operator (what the control socket does).

        The request is checked as the control socket checks what it decodes: anything but a
        request of `cluster.control` raises `TypeError`, a field of the wrong type
        (``SessionCreate(slots="2", ...)``) `ValueError` naming the field.
        """
        return await self.service.handle_local(control.check_request(request))

    def stop(self) -> None:
        self.master.stop()

    def close(self) -> None:
        """Close the log and release the data directory (call after `run` returned, or
        instead of running)."""
        try:
            self.master.close()
            self.store.close()
        finally:
            self._dir_lock.release()


def _reconnected(state: State, node: str, boot_id: str, now_ms: int) -> list[Event]:
    """A worker that restarted and reconnects during its own maintenance window finishes it."""
    back = on_reconnect(state, node, boot_id, now_ms)
    return [back] if back is not None else []
