"""tests/slurm_cluster.py stops the daemons a test session started, once nobody uses them (issue 24).

SLURM itself is not needed here: the daemons are stand-ins (real ``sleep``
processes whose pids stand in ``ROOT/<daemon>.pid``, as slurmctld and slurmd
write them), stopped for real by :func:`slurm_cluster.stop_if_unused`. The
leases are real ``flock`` locks, one of them held by another process.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import slurm_cluster

HOLD_LEASE = """
import sys
sys.path.insert(0, sys.argv[2])
import slurm_cluster
from pathlib import Path
slurm_cluster.ROOT = Path(sys.argv[1])
slurm_cluster._take_lease()
print("leased", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def daemons(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    """Stand-ins for slurmctld and slurmd of a cluster rooted in ``tmp_path``."""
    monkeypatch.setattr(slurm_cluster, "ROOT", tmp_path)
    monkeypatch.setattr(slurm_cluster, "_lease", None)
    procs = {name: subprocess.Popen(["sleep", "600"]) for name in ("slurmctld", "slurmd")}
    for name, proc in procs.items():
        (tmp_path / f"{name}.pid").write_text(f"{proc.pid}\n")
    yield procs
    slurm_cluster.release()
    for proc in procs.values():
        proc.kill()
        proc.wait(timeout=30)


def _running(procs: dict[str, subprocess.Popen[bytes]]) -> bool:
    return all(proc.poll() is None for proc in procs.values())


def test_daemons_a_session_started_are_stopped_when_nobody_uses_them(
    daemons: dict[str, subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    (tmp_path / "started-by-tests").write_text("1\n")
    slurm_cluster._take_lease()  # this process used the cluster (ensure() takes it)
    other = subprocess.Popen(
        [sys.executable, "-c", HOLD_LEASE, str(tmp_path), str(Path(slurm_cluster.__file__).parent)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert other.stdout is not None and other.stdout.readline() == b"leased\n"
        # Another process (a worker, another session) still uses it: left running, for that one to stop.
        assert slurm_cluster.stop_if_unused(wait=0.5) is False
        assert _running(daemons) and (tmp_path / "started-by-tests").exists()
    finally:
        assert other.stdin is not None
        other.stdin.close()
        other.wait(timeout=30)
        if other.stdout is not None:
            other.stdout.close()
    assert slurm_cluster.stop_if_unused() is True
    for proc in daemons.values():
        assert proc.wait(timeout=30) == -15, "stopped with SIGTERM"
    assert not (tmp_path / "started-by-tests").exists()


def test_a_cluster_started_by_hand_stays_up(daemons: dict[str, subprocess.Popen[bytes]]) -> None:
    """`python tests/slurm_cluster.py up` leaves no marker: the session that reused the cluster leaves it be."""
    slurm_cluster._take_lease()
    assert slurm_cluster.stop_if_unused() is False
    assert _running(daemons)
