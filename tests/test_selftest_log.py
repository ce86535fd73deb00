"""The worker's own log says how its runner self-test went: before, only `cluster status`
showed a failed one, while the worker's log read `connected` and `caught up` as if the node
would serve."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from embedded_nodes import embedded_cluster, until_self_tested

from cluster.worker.runners.registry import RunnerSetting


def _self_test_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "cluster.worker.node" and "runner self-test" in r.getMessage()
    ]


@pytest.mark.anyio
async def test_a_failed_self_test_is_an_error_in_the_workers_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cluster.worker.node")
    runner = RunnerSetting(kind="simulated", config={"fail_load": "weights corrupt"})
    async with embedded_cluster(tmp_path, runner=runner) as cluster:
        rec = await until_self_tested(cluster.master, cluster.worker.node_id)
    assert rec.self_test is not None and not rec.self_test.passed
    records = _self_test_records(caplog)
    assert len(records) == 1, caplog.text  # once per test
    assert records[0].levelno == logging.ERROR
    message = records[0].getMessage()
    assert "failed" in message and "load: weights corrupt" in message, message
    assert "no slots" in message, message


@pytest.mark.anyio
async def test_a_passed_self_test_is_said_once_at_info(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cluster.worker.node")
    runner = RunnerSetting(kind="simulated", config={"load_s": 0.05})
    async with embedded_cluster(tmp_path, runner=runner) as cluster:
        rec = await until_self_tested(cluster.master, cluster.worker.node_id)
    assert rec.self_test is not None and rec.self_test.passed, rec.self_test
    records = _self_test_records(caplog)
    assert [(r.levelno, "passed" in r.getMessage()) for r in records] == [(logging.INFO, True)]
