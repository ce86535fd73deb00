"""Embedding: a master and two workers in one program (examples/embedded_cluster.py).

The example is what docs/embedding.md shows; running it here keeps both true. It serves a
session from runners on both workers, then checks that each worker's replica equals the fold
of the master's log at the replica's index. `cluster replay` of the same log agrees.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

from cluster import cli

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "embedded_cluster.py"


def _load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("embedded_cluster", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_embedded_master_and_workers_agree_with_the_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    example = _load_example()
    assert example.main(["--data-dir", str(tmp_path), "--seconds", "1"]) == 0
    out = capsys.readouterr().out
    assert "3 runners running" in out, out
    replicas = re.findall(r"^replica (\S+) at (\d+): ([0-9a-f]{64}) matches the log$", out, re.M)
    assert len(replicas) == 2 and len({node for node, _, _ in replicas}) == 2, out
    # The command-line replay of the same log reaches the same digest at each index.
    for _, idx, digest in replicas:
        assert cli.main(["replay", str(tmp_path / "master"), "--until", idx, "--digest"]) == 0
        assert capsys.readouterr().out.strip() == digest


def test_embedded_example_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    example = _load_example()
    with pytest.raises(SystemExit) as exc:
        example.main(["--seconds", "-1"])
    assert exc.value.code == 2
    assert "--seconds must be >= 0" in capsys.readouterr().err


def test_a_bad_setting_releases_what_the_node_opened(tmp_path: Path) -> None:
    from cluster.master.http_api import HttpApiConfig, HttpApiConfigError
    from cluster.master.node import MasterNode, MasterNodeConfig
    from cluster.net.membership import Membership
    from cluster.worker.node import WorkerNode, WorkerNodeConfig
    from cluster.worker.runners.base import RunnerConfigError
    from cluster.worker.runners.registry import RunnerSetting

    membership = Membership(secret=b"s" * 32)
    exposed = MasterNodeConfig(http=HttpApiConfig(host="0.0.0.0", port=0))
    with pytest.raises(HttpApiConfigError, match="exposes it beyond this machine"):
        MasterNode(tmp_path / "m", membership, exposed)
    MasterNode(tmp_path / "m", membership).close()  # the log was released: it opens again
    addr = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWJWoaqZhDaoEFshF7Rh1bpY9ohihFhzcW6d69Lr2NASuq"
    # A runner kind nobody provides, or a bad config for a known one, is refused before
    # anything is opened, naming what is wrong (before, an embedding program learnt of a
    # bad config only from a failed self-test in `cluster status`).
    bad_runner = WorkerNodeConfig(runner=RunnerSetting(kind="no-such-kind"))
    with pytest.raises(RunnerConfigError, match="no-such-kind"):
        WorkerNode(tmp_path / "w", addr, bad_runner)
    bad_config = WorkerNodeConfig(runner=RunnerSetting(kind="simulated", config={"load_secs": 1}))
    with pytest.raises(RunnerConfigError, match=r"runner 'simulated' config: .*load_secs"):
        WorkerNode(tmp_path / "w", addr, bad_config)
    # Not plain data: its digest (sent in every hello) raised TypeError / UnicodeEncodeError.
    for value in (Path("/opt/model"), "weights-\udcff.bin"):
        odd = WorkerNodeConfig(runner=RunnerSetting(kind="subprocess", config={"command": [value]}))
        with pytest.raises(RunnerConfigError, match="its config must be plain data"):
            WorkerNode(tmp_path / "w", addr, odd)
    WorkerNode(tmp_path / "w", addr).close()


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under `root` with its inode and size: what a refused node must not touch."""
    return {
        str(p.relative_to(root)): (p.lstat().st_ino, p.lstat().st_size) for p in root.rglob("*")
    }


def test_a_data_directory_of_the_other_role_is_refused_before_anything_is_made(
    tmp_path: Path,
) -> None:
    """A worker on a master's data directory loaded the master's `node.key` and joined with
    the master's own id (left DISCONNECTED in status for good), leaving an `outbox/` there;
    a master on a worker's took the worker's id and wrote its log beside the outbox. Each is
    refused now, naming the directory and what it found, with nothing created or changed."""
    from cluster.datadir import DataDirError
    from cluster.master.node import MasterNode
    from cluster.net.membership import Membership
    from cluster.worker.client import Worker
    from cluster.worker.node import WorkerNode

    membership = Membership(secret=b"s" * 32)
    addr = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWJWoaqZhDaoEFshF7Rh1bpY9ohihFhzcW6d69Lr2NASuq"
    mdir, wdir = tmp_path / "m", tmp_path / "w"
    MasterNode(mdir, membership).close()
    WorkerNode(wdir, addr).close()
    before = _tree(tmp_path)
    master_log = "a worker needs a data directory of its own"
    with pytest.raises(DataDirError, match=rf"^data directory {mdir} holds a master's event "):
        WorkerNode(mdir, addr)
    with pytest.raises(DataDirError, match=master_log):  # the connection part alone, too
        Worker(mdir, addr)
    with pytest.raises(DataDirError, match=rf"^data directory {wdir} holds a worker's outbox "):
        MasterNode(wdir, membership)
    assert _tree(tmp_path) == before
    # Each still opens its own.
    MasterNode(mdir, membership).close()
    WorkerNode(wdir, addr).close()


def test_a_directory_of_the_other_role_from_before_the_lock_gets_no_lock_file(
    tmp_path: Path,
) -> None:
    """A master's directory from before the data-directory lock has no LOCK file: a worker
    refused there used to leave one behind (it locked before it checked the role)."""
    from cluster.datadir import DataDirError
    from cluster.master.node import MasterNode
    from cluster.net.membership import Membership
    from cluster.worker.node import WorkerNode

    mdir = tmp_path / "m"
    MasterNode(mdir, Membership(secret=b"s" * 32)).close()
    (mdir / "LOCK").unlink()  # as an older version left it
    before = _tree(tmp_path)
    addr = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWJWoaqZhDaoEFshF7Rh1bpY9ohihFhzcW6d69Lr2NASuq"
    with pytest.raises(DataDirError, match="holds a master's event log"):
        WorkerNode(mdir, addr)
    assert _tree(tmp_path) == before


def test_a_leftover_of_the_other_role_beside_its_own_mark_is_warned_not_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker once started on a master's directory (before the role check) left an
    `outbox/` beside the master's log: the master then refused its own directory as "a
    worker's". Its log proves whose it is: it starts, and a WARNING names the leftover."""
    from cluster.master.node import MasterNode
    from cluster.net.membership import Membership
    from cluster.worker.node import WorkerNode

    membership = Membership(secret=b"s" * 32)
    addr = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWJWoaqZhDaoEFshF7Rh1bpY9ohihFhzcW6d69Lr2NASuq"
    mdir, wdir = tmp_path / "m", tmp_path / "w"
    MasterNode(mdir, membership).close()
    WorkerNode(wdir, addr).close()
    (mdir / "outbox").mkdir()
    (wdir / "log").mkdir()
    with caplog.at_level("WARNING", logger="cluster.datadir"):
        MasterNode(mdir, membership).close()
        WorkerNode(wdir, addr).close()
    assert [r.getMessage() for r in caplog.records] == [
        f"data directory {mdir} holds a worker's outbox ({mdir / 'outbox'}) beside its own "
        "log: left by a worker once started here by mistake; a master does not use it, and "
        "it may be removed",
        f"data directory {wdir} holds a master's event log ({wdir / 'log'}) beside its own "
        "outbox: left by a master once started here by mistake; a worker does not use it, "
        "and it may be removed",
    ]


@pytest.mark.anyio
async def test_a_request_built_wrong_in_python_is_refused_by_name(tmp_path: Path) -> None:
    """Not a request: it used to be answered "the operator must name the node"; a field of
    the wrong type: a TypeError from deep inside the decision."""
    from cluster.control import MaintenanceSchedule, SessionCreate
    from cluster.master.node import MasterNode
    from cluster.net.membership import Membership

    node = MasterNode(tmp_path / "m", Membership(secret=b"s" * 32))
    try:
        for junk in ("junk", None, {"request": "SessionList"}):
            with pytest.raises(TypeError, match=r"expected a request of cluster\.control .* got"):
                await node.request(junk)  # type: ignore[arg-type]
        wrong_type = r"bad SessionCreate: Expected `int`, got `str` - at `\$\.slots`"
        with pytest.raises(ValueError, match=wrong_type):
            await node.request(SessionCreate(slots="2", memory_per_slot_mb=1))  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"got `bool` - at `\$\.slots`"):
            await node.request(SessionCreate(slots=True, memory_per_slot_mb=1))
        with pytest.raises(ValueError, match=r"at `\$\.gpu`"):
            await node.request(SessionCreate(slots=1, memory_per_slot_mb=1, gpu=2))  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"at `\$\.duration_ms`"):
            await node.request(MaintenanceSchedule(in_ms=0, duration_ms=1.5))  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"bad SessionCreate: .*object"):
            await node.request(SessionCreate(slots=object(), memory_per_slot_mb=1))  # type: ignore[arg-type]
        assert node.state.last_applied == 0  # nothing was decided
    finally:
        node.close()


@pytest.mark.anyio
@pytest.mark.parametrize("grant_ms", [None, 30 * 60_000])
async def test_an_embedded_http_api_shows_the_masters_credit_grant(
    tmp_path: Path, grant_ms: int | None
) -> None:
    """docs/operations.md "Embedding": `HttpApi(view, ...)` defaulted to no credit grant
    (a fresh node showed 0 where the master grants 2 h), and the documented view was the
    master, which embedders know only as a `MasterNode`: that answered /api/status with 500."""
    import json
    import urllib.request

    import anyio
    from maintenance_log import Log, node_id

    from cluster.master.http_api import HttpApi, HttpApiConfig
    from cluster.master.node import MasterNode, MasterNodeConfig
    from cluster.net.membership import Membership
    from cluster.shared.maintenance_policy import DEFAULT_POLICY, MaintenancePolicy
    from cluster.shared.store import EventStore

    log = Log()
    log.join(node_id(1))
    with EventStore.open(tmp_path / "m") as store:
        store.append(log.log)
    policy = DEFAULT_POLICY if grant_ms is None else MaintenancePolicy(initial_credit_ms=grant_ms)
    node = MasterNode(tmp_path / "m", Membership(secret=b"s" * 32), MasterNodeConfig(policy=policy))
    try:
        with pytest.raises(TypeError, match=r"a MasterNode has no now_ms, .*node\.http_api"):
            HttpApi(node, HttpApiConfig(), initial_credit_ms=0)  # type: ignore[arg-type]
        api = node.http_api(HttpApiConfig(host="127.0.0.1", port=0))
        async with anyio.create_task_group() as tg:
            port = await tg.start(api.serve)
            url = f"http://127.0.0.1:{port}/api/status"
            body = await anyio.to_thread.run_sync(
                lambda: urllib.request.urlopen(url, timeout=10).read()
            )
            tg.cancel_scope.cancel()
        (shown,) = json.loads(body)["nodes"]
        assert shown["credit_ms"] == policy.initial_credit_ms  # 2 h by default
    finally:
        node.close()


@pytest.mark.anyio
async def test_an_embedded_worker_forwards_a_request_object_and_gets_a_reply(
    tmp_path: Path,
) -> None:
    """docs/embedding.md: `node.worker.request_master(payload)` given a request object was
    sent as is and refused by the master ("Expected bytes, got object"), after a round trip."""
    import anyio
    from embedded_nodes import embedded_cluster

    from cluster.control import MaintenanceNext, Reply, decode_reply, encode_message

    # On the way out the worker stops and finishes, then the master stops.
    async with embedded_cluster(tmp_path) as cluster:
        worker = cluster.worker
        while not worker.worker.connected:
            await anyio.sleep(0.05)
        reply = await worker.worker.request(MaintenanceNext())
        assert isinstance(reply, Reply) and reply.ok, reply
        assert "earliest" in reply.message or "window" in reply.message, reply.message
        # The encoded form still works, and gives the same answer encoded.
        raw = await worker.worker.request_master(encode_message(MaintenanceNext()))
        assert decode_reply(raw) == reply
        # Refused here, by name, before anything is sent.
        with pytest.raises(TypeError, match=r"got MaintenanceNext: pass a request"):
            await worker.worker.request_master(MaintenanceNext())  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"request of cluster\.control .* got str"):
            await worker.worker.request("not a request")  # type: ignore[arg-type]
