"""A worker the master refuses says so as an ERROR naming why, and keeps retrying."""

from __future__ import annotations

import logging
import secrets
from pathlib import Path

import anyio
import pytest
from cluster_procs import start_master
from embedded_nodes import fast_master

import cluster.worker.client as client_module
from cluster.net.identity import load_identity
from cluster.net.membership import create_secret_file
from cluster.net.protocol import PROTOCOL_VERSION
from cluster.worker.client import Worker, WorkerConfig


@pytest.mark.anyio
async def test_a_worker_of_another_protocol_version_is_refused_with_an_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    mdir, logs = tmp_path / "master", tmp_path / "logs"
    logs.mkdir()
    load_identity(mdir)
    secret = create_secret_file(mdir / "cluster.secret")
    master, addr = start_master(mdir, logs)
    # This worker speaks the previous protocol: the state it would be sent has a layout it
    # cannot decode, so the master must refuse it at the hello rather than later.
    monkeypatch.setattr(client_module, "PROTOCOL_VERSION", PROTOCOL_VERSION - 1)
    config = WorkerConfig(secret=secret, connect_timeout=5, backoff_initial=0.05, backoff_max=0.2)
    worker = Worker(tmp_path / "worker", addr, config)
    refused = (
        f"master refused this worker: peer reported version: protocol version "
        f"{PROTOCOL_VERSION - 1} unsupported (this master speaks {PROTOCOL_VERSION})"
    )
    try:
        with caplog.at_level(logging.INFO, logger="cluster.worker.client"):
            with anyio.fail_after(60):
                async with anyio.create_task_group() as tg:
                    await tg.start(worker.run)
                    while not any(
                        r.levelno == logging.ERROR and refused in r.getMessage()
                        for r in caplog.records
                    ):
                        await anyio.sleep(0.05)
                    # It keeps trying (an operator may upgrade the master), still not joined.
                    attempts = sum(refused in r.getMessage() for r in caplog.records)
                    while sum(refused in r.getMessage() for r in caplog.records) == attempts:
                        await anyio.sleep(0.05)
                    assert worker.phase == "connecting"
                    worker.stop()
    finally:
        worker.close()
        assert master.stop() == 0
    assert not any("unreachable" in r.getMessage() for r in caplog.records)


@pytest.mark.anyio
@pytest.mark.parametrize("has_secret", [False, True])
async def test_a_worker_without_a_secret_is_told_it_has_none(
    has_secret: bool, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Refused with only the master's "failed the cluster-secret challenge", a worker started
    without --cluster-secret-file was not told that it has no secret to answer with."""
    secret = secrets.token_bytes(32)
    master = fast_master(tmp_path / "master", secret)
    worker_secret = secrets.token_bytes(32) if has_secret else None  # the wrong one
    config = WorkerConfig(secret=worker_secret, backoff_initial=0.05, backoff_max=0.2)
    worker = None
    try:
        with caplog.at_level(logging.INFO, logger="cluster.worker.client"):
            with anyio.fail_after(60):
                async with anyio.create_task_group() as tg:
                    started = await tg.start(master.run)
                    worker = Worker(tmp_path / "worker", started.addrs[0], config)
                    await tg.start(worker.run)
                    while not any(r.levelno == logging.ERROR for r in caplog.records):
                        await anyio.sleep(0.02)
                    worker.stop()
                    await worker.wait_finished()
                    master.stop()
    finally:
        if worker is not None:
            worker.close()
        master.close()
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    hint = "this worker has no cluster secret: pass --cluster-secret-file with the master's"
    if has_secret:  # a secret that differs: the worker refuses the master's proof first
        assert "this worker's secret file differs from the master's" in errors[0], errors
        assert hint not in errors[0]
    else:
        assert worker is not None
        assert errors[0] == (
            f"master refused this worker: peer reported unauthorized: peer {worker.node_id} "
            f"failed the cluster-secret challenge ({hint} cluster.secret)"
        ), errors
