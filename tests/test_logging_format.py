"""Every line the long-running commands log has one format, py-libp2p's lines included.

py-libp2p turns propagation off for its loggers on import, so before `setup_logging` took
them over their warnings reached stderr through logging's last-resort handler as bare
messages ("failed to upgrade security for peer ...": no time, level or logger).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cluster_procs import Proc, start_master, wait_until

#: `%(asctime)s %(levelname)s %(name)s: %(message)s`
OUR_FORMAT = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) \S+: ")

SCRIPT = textwrap.dedent(
    """
    import logging, sys, warnings
    import cluster.net.host  # imports py-libp2p, which configures its loggers
    from cluster.commands._process import setup_logging

    setup_logging(sys.argv[1])
    logging.getLogger("libp2p.network.swarm").error("libp2p error line")
    logging.getLogger("libp2p.network.swarm").warning("libp2p warning line")
    logging.getLogger("libp2p.network.swarm").info("libp2p info line")
    logging.getLogger("libp2p.network.swarm").debug("libp2p debug line")
    # py-libp2p sets this one to INFO itself: a level on "libp2p" cannot hold it back.
    logging.getLogger("libp2p.network.auto_connector").info("auto connector info line")
    logging.getLogger("multiaddr").info("multiaddr info line")
    # py-libp2p's records of a failed dial, as it logs them (demoted to DEBUG).
    logging.getLogger("libp2p.transport.tcp.tcp").error("Failed to open TCP stream: %s", "x")
    logging.getLogger("libp2p.network.swarm").error(
        "failed to upgrade security for peer %s: %s", "12D3KooW", "handshake failed"
    )
    logging.getLogger("libp2p.protocol_muxer.multiselect_client").error(
        "MultiselectClient handshake: read failed: %s", "fail to read"
    )
    # Churn it logs at ERROR: an inbound peer that did not finish connecting (a WARNING).
    logging.getLogger("libp2p.network.swarm").error("fail to upgrade mux for peer %s", "12D3KooW")
    logging.getLogger("cluster.worker.client").info("our info line")
    logging.getLogger("cluster.worker.client").debug("our debug line")
    warnings.warn("a library warning", UserWarning, stacklevel=1)
    """
)


def _run(level: str, **env: str) -> list[str]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, level],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": src, **env},
        check=True,
    )
    assert proc.stdout == ""
    return proc.stderr.splitlines()


def test_libp2p_lines_come_out_in_our_format_and_its_chatter_stays_out() -> None:
    """Its dial failures included: the worker's own INFO line says the master is unreachable
    and why (below), every other py-libp2p ERROR and WARNING still shows."""
    lines = _run("INFO", LIBP2P_DEBUG="")
    assert [line for line in lines if not OUR_FORMAT.match(line)] == []
    assert [line.split(" ", 2)[2] for line in lines] == [
        "ERROR libp2p.network.swarm: libp2p error line",
        "WARNING libp2p.network.swarm: libp2p warning line",
        "WARNING libp2p.network.swarm: fail to upgrade mux for peer 12D3KooW",
        "INFO cluster.worker.client: our info line",
        "WARNING py.warnings: UserWarning: a library warning (<string>:26)",
    ]


@pytest.mark.parametrize("level", ["DEBUG", "WARNING"])
def test_the_log_level_applies_to_ours_and_libp2p_stays_at_warning_or_above(level: str) -> None:
    lines = _run(level, LIBP2P_DEBUG="")
    text = "\n".join(lines)
    assert [line for line in lines if not OUR_FORMAT.match(line)] == []
    assert "libp2p warning line" in text
    assert "libp2p info line" not in text and "libp2p debug line" not in text
    assert "auto connector info line" not in text and "multiaddr info line" not in text
    assert ("our debug line" in text) == (level == "DEBUG")
    assert ("our info line" in text) == (level == "DEBUG")


def test_libp2p_debug_env_still_shows_what_it_asks_for_in_our_format() -> None:
    lines = _run("INFO", LIBP2P_DEBUG="libp2p.network.swarm:DEBUG")
    # py-libp2p prints where its own log file is, once, when it is imported: not a log line.
    lines = [line for line in lines if not line.startswith("Logging to: ")]
    assert [line for line in lines if not OUR_FORMAT.match(line)] == []
    text = "\n".join(lines)
    assert " DEBUG libp2p.network.swarm: libp2p debug line" in text
    assert " INFO libp2p.network.swarm: libp2p info line" in text
    # A dial failure it names at DEBUG shows, as DEBUG; one on a logger it leaves alone not.
    assert " DEBUG libp2p.network.swarm: failed to upgrade security for peer 12D3KooW" in text
    assert "Failed to open TCP stream" not in text
    assert "multiaddr info line" not in text
    # Each record once: py-libp2p's own handler (its format) is gone, ours prints it.
    assert text.count("libp2p debug line") == 1


@pytest.mark.slow
@pytest.mark.parametrize("target", ["closed port", "wrong peer id", "http port"])
def test_a_worker_retrying_its_master_logs_one_line_per_retry(target: str, tmp_path: Path) -> None:
    """py-libp2p logged every failed attempt at ERROR, four attempts per dial ("Failed to open
    TCP stream", or "failed to upgrade security for peer" for a wrong peer id, or
    "MultiselectClient handshake: read failed" for the master's HTTP port), beside the
    worker's own INFO "master at ... unreachable (...); retrying in N s". That line alone
    remains, and names the reason py-libp2p's lines gave (for the HTTP port it was
    `ParseError: msg_bytes is not delimited ... b'TTP/1.1 400 Bad Request...'`)."""
    logs = tmp_path / "logs"
    logs.mkdir()
    wrong_id = "12D3KooWGzh3y4rZ5g7b6jz9cTzKs3dZnmpKq1z3Ku9tXbq6Tx7E"
    master = None
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        if target == "closed port":
            addr = f"/ip4/127.0.0.1/tcp/{closed.getsockname()[1]}/p2p/{wrong_id}"
            reason = "ConnectionRefusedError: "
        elif target == "http port":
            master, real = start_master(tmp_path / "master", logs)
            url_file = tmp_path / "master" / "http.url"
            wait_until(url_file.exists, 30, "http.url")
            http_port = url_file.read_text().strip().rstrip("/").rsplit(":", 1)[1]
            addr = real.replace(real.split("/")[4], http_port, 1)
            assert f"/tcp/{http_port}/p2p/" in addr
            reason = "(it answers like an HTTP server, not a libp2p port: is it the master's --http"
        else:
            master, real = start_master(tmp_path / "master", logs, "--http", "off")
            addr = real.rsplit("/p2p/", 1)[0] + f"/p2p/{wrong_id}"
            reason = "PeerIDMismatchesPubkey: peer id does not correspond to the received pubkey"
        worker = Proc(
            "worker",
            [
                "worker",
                "--data-dir",
                str(tmp_path / "w"),
                "--master",
                addr,
                "--no-info",
                "--no-runners",
            ],
            logs,
        )
        try:
            wait_until(
                lambda: worker.log_text().count(" unreachable (") >= 3 or worker.popen.poll(),
                60,
                "three retries",
            )
        finally:
            codes = [worker.stop()] + ([master.stop()] if master is not None else [])
    assert codes == [0] * len(codes), codes
    lines = worker.log_text().splitlines()
    logged = [line for line in lines if OUR_FORMAT.match(line)]
    assert [line for line in logged if " INFO " not in line] == [], lines
    retries = [line for line in logged if " unreachable (" in line]
    assert len(retries) >= 3 and all(reason in line for line in retries), retries
