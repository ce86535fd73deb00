"""`cluster selfcheck` passes on a healthy build and names the stage that a defect breaks."""

from __future__ import annotations

from typing import Any

import pytest

from cluster import cli


def test_selfcheck_passes(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["selfcheck"]) == 0
    out = capsys.readouterr().out
    for stage in (
        "join",
        "self-test",
        "epoch",
        "placement",
        "catch-up",
        "work",
        "settlement",
        "maintenance",
        "staleness",
        "replay",
    ):
        assert f"PASS  {stage}" in out
    assert "all stages passed" in out


def test_broken_placement_fails_at_placement(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import cluster.master.planner as planner
    from cluster.shared.events import SessionUnplaced

    def place_nothing(sessions: Any, epoch: Any, *args: Any, **kwargs: Any) -> list[object]:
        return [
            SessionUnplaced(session_id=s.session_id, epoch=epoch.epoch, reason="broken on purpose")
            for s in sessions
        ]

    monkeypatch.setattr(planner, "place_sessions", place_nothing)
    assert cli.main(["selfcheck"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  placement" in out and "FAILED at placement" in out
    assert "broken on purpose" in out
    assert "PASS  epoch" in out and "SKIP  replay" in out


def test_forgetting_the_reconnect_rule_fails_at_maintenance(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import cluster.selfcheck as selfcheck

    monkeypatch.setattr(selfcheck, "on_reconnect", lambda *args: None)
    assert cli.main(["selfcheck"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  maintenance" in out and "after the reconnect" in out
    assert "PASS  settlement" in out
