"""`cluster master` when the disk refuses a commit: one ERROR line, exit 2, no traceback.

The master is fail-stop on a commit's I/O error (what the page cache holds after a failed
fsync is unknown). Its own `Master` said so in one line, but the command then printed the
control handler's traceback and a ~70-line exception group, and exited 1.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from cluster_procs import wait_until
from cluster_scenarios import cluster_cli

WRAPPER = textwrap.dedent(
    """
    import errno, os, sys
    from cluster.shared import eventlog
    real = eventlog._fdatasync
    def failing(fd):
        if os.path.exists(sys.argv[1]):  # the test says when the disk goes bad
            raise OSError(errno.EIO, "Input/output error")
        return real(fd)
    eventlog._fdatasync = failing
    from cluster.cli import main
    sys.exit(main(sys.argv[2:]))
    """
)


def test_a_commit_the_disk_refuses_ends_the_master_in_one_line(tmp_path: Path) -> None:
    data_dir, flag = tmp_path / "m", tmp_path / "disk-is-bad"
    wrapper = tmp_path / "master_eio.py"
    wrapper.write_text(WRAPPER)
    args = ["master", "--data-dir", str(data_dir), "--listen", "/ip4/127.0.0.1/tcp/0"]
    master = subprocess.Popen(
        [sys.executable, str(wrapper), str(flag), *args, "--http", "off"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        wait_until(
            lambda: (data_dir / "master.addr").exists() or master.poll() is not None,
            30,
            "the master to start",
        )
        assert master.poll() is None
        flag.touch()
        created = cluster_cli(
            "session", "--data-dir", str(data_dir), "create", "--slots", "1", "--memory-mb", "1"
        )
        assert created.returncode != 0
        assert "Input/output error" in created.stderr, created.stderr
        _, err = master.communicate(timeout=30)
    finally:
        if master.poll() is None:
            master.kill()
            master.communicate()
    assert master.returncode == 2, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "event log write failed" in errors[0], err
