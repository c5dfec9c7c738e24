"""A one-node SLURM cluster for the tests, set up here: apt packages, daemons started directly (no systemd).

    python tests/slurm_cluster.py up      # install what is missing, start munged, slurmctld, slurmd
    python tests/slurm_cluster.py down    # stop the SLURM daemons again

:func:`ensure` does the same from a test and says why it cannot (not Linux,
not root, no apt, packages that do not install, a daemon that does not come
up) with :class:`Unavailable`, for the test to skip with that reason.

Everything of this cluster lives in :data:`ROOT`: its ``slurm.conf`` (the
daemons and every client get it through ``SLURM_CONF``, with ports of its
own), state, spool, daemon logs and the job completion log. A real cluster's
``/etc/slurm`` is never read or written. What a one-node cluster without
systemd or cgroups needs (measured with Debian's SLURM 22.05): ``munged``
running as user ``munge`` with ``/run/munge`` created first; process tracking
by parent (``proctrack/linuxproc``) and no task plugin; the node named
``hostname -s``, resolvable, with what ``slurmd -C`` reports (a larger
``RealMemory`` keeps the node down); ``SlurmUser=root``. Jobs oversubscribe
the node's CPUs, so the cases of a test run can run side by side.

Daemons that a test session started are stopped at the end of the session
(:func:`stop_if_unused`, from tests/conftest.py's ``pytest_sessionfinish``)
once no process uses them: every process that calls :func:`ensure` holds a
shared ``flock`` on ``ROOT/users.lock`` until it ends (or :func:`release`),
and the daemons are stopped only by whoever gets it exclusively, so test
sessions side by side (and the workers of one) never lose the cluster under
a running test. A cluster started with ``up`` is the user's: it stays up
until ``down``. slurmd runs with a raised nice value, so the jobs (which
inherit it) give the CPU to the rest of the test suite first.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path("/tmp/ckptbus-slurm")
CONF = ROOT / "slurm.conf"
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
COMMANDS = ("slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo", "munged", "munge")
CTLD_PORT, SLURMD_PORT = 16817, 16818  # not SLURM's defaults (6817/6818), so a real cluster's daemons stay apart
KILL_WAIT = 30
"""Seconds between SIGTERM and SIGKILL at a time limit, a requeue or scancel (SLURM's default)."""
JOB_NICE = 10
"""The nice value of slurmd, inherited by every job: the jobs yield the CPU to the other tests."""

CONF_TEMPLATE = """\
# Written by tests/slurm_cluster.py: a one-node cluster for ckptbus's tests.
ClusterName=ckptbus
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={root}/jobcomp.log
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
KillWait={kill_wait}
MinJobAge=3600
ReturnToService=2
{node} State=UNKNOWN
PartitionName=ckptbus Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:8
"""


class Unavailable(Exception):
    """No SLURM cluster can run here; the message says why."""


def env() -> dict[str, str]:
    """The environment for SLURM clients (``sbatch``, ``scontrol``...) talking to this cluster."""
    return {**os.environ, "SLURM_CONF": str(CONF)}


def ensure(*, by_tests: bool = True) -> None:
    """Have the cluster up, its node idle; install and start what is missing. Raises :class:`Unavailable`.

    This process holds a lease on the cluster from now until it ends or calls :func:`release`.
    ``by_tests``: daemons started here are stopped at the end of the test session (:func:`stop_if_unused`);
    False (``up``): they are the user's, and stay up.
    """
    why = _cannot_run()
    if why:
        raise Unavailable(why)
    ROOT.mkdir(parents=True, exist_ok=True)
    with _locked(ROOT / ".lock"):  # test workers side by side set up one cluster
        _take_lease()
        if not by_tests:
            _started_by_tests().unlink(missing_ok=True)  # the user's from now on, whoever started it
        _install()
        _start_munge()
        conf = _conf_text()
        if _daemons_alive() and _running_conf() == _digest(conf) and _node_state() in ("idle", "mixed", "allocated"):
            return
        stop()
        _start_slurm(conf)
        if by_tests:
            _started_by_tests().write_text(f"{os.getpid()}\n")


_lease: int | None = None
"""This process's shared flock on ``ROOT/users.lock`` while it uses the cluster."""


def _lease_path() -> Path:
    return ROOT / "users.lock"


def _started_by_tests() -> Path:
    """Present while the running daemons were started by a test session (not by ``up``)."""
    return ROOT / "started-by-tests"


def _take_lease() -> None:
    global _lease
    if _lease is None:
        fd = os.open(_lease_path(), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        fcntl.flock(fd, fcntl.LOCK_SH)  # blocks only while stop_if_unused holds it, under ROOT/.lock
        _lease = fd


def release() -> None:
    """This process no longer uses the cluster (its end does the same)."""
    global _lease
    fd, _lease = _lease, None
    if fd is not None:
        os.close(fd)


def stop_if_unused(wait: float = 5.0) -> bool:
    """End this process's use of the cluster; then, if a test session started the daemons and no process uses
    them any more (waiting up to ``wait`` seconds for processes that are exiting), stop them. Returns whether
    they were stopped. Another session still using them stops them at its own end."""
    release()
    marker = _started_by_tests()
    if not marker.exists():
        return False
    with _locked(ROOT / ".lock"):
        if not marker.exists():
            return False
        fd = os.open(_lease_path(), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            deadline = time.monotonic() + wait
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        return False
                    time.sleep(0.1)
            stop()
            marker.unlink(missing_ok=True)
            return True
        finally:
            os.close(fd)  # drops the exclusive lock


def stop() -> None:
    """Stop this cluster's slurmctld and slurmd (munged is left: other programs may use it)."""
    for name in ("slurmd", "slurmctld"):
        pid = _pid(name)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            _wait(functools.partial(_gone, pid), f"{name} to stop", 30)


# -- what has to hold -------------------------------------------------------------------------


def _cannot_run() -> str | None:
    if platform.system() != "Linux":
        return "SLURM's daemons run on Linux only"
    if os.geteuid() != 0:
        return "setting up a SLURM cluster needs root (apt-get, daemons run as root)"
    host = socket.gethostname().split(".")[0]
    try:
        socket.gethostbyname(host)
    except OSError:
        return f"the node name {host!r} (hostname -s) does not resolve; SLURM needs it to"
    if not all(shutil.which(c) for c in COMMANDS) and not shutil.which("apt-get"):
        return f"SLURM is not installed and there is no apt-get to install {' '.join(PACKAGES)}"
    return None


def _install() -> None:
    if all(shutil.which(c) for c in COMMANDS):
        return
    apt_env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]
    done = _run(install, env=apt_env, timeout=600, check=False)
    if done.returncode != 0:  # a fresh machine may have no package lists yet
        _run(["apt-get", "update", "-qq"], env=apt_env, timeout=600, check=False)
        done = _run(install, env=apt_env, timeout=600, check=False)
    if done.returncode != 0 or not all(shutil.which(c) for c in COMMANDS):
        tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
        raise Unavailable(f"`{' '.join(install)}` failed: {' / '.join(tail)}")


def _start_munge() -> None:
    if _munge_works():
        return
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        _run(["mungekey", "--create", "--keyfile", str(key)])
    for directory in (Path("/run/munge"), Path("/var/log/munge"), Path("/var/lib/munge"), key.parent):
        directory.mkdir(parents=True, exist_ok=True)
        shutil.chown(directory, "munge", "munge")
    shutil.chown(key, "munge", "munge")
    key.chmod(0o400)
    _run(["runuser", "-u", "munge", "--", "munged"], env=_daemon_env())
    _wait(_munge_works, "munged to answer", 30)


def _munge_works() -> bool:
    try:
        credential = subprocess.run(["munge", "-n"], capture_output=True, timeout=10, check=True).stdout
        subprocess.run(["unmunge"], input=credential, capture_output=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return False
    return True


def _conf_text() -> str:
    # slurmd -C: this machine as a node line (NodeName=<hostname -s> CPUs=... RealMemory=...).
    reported = _run(["slurmd", "-C"]).stdout
    node = next((line for line in reported.splitlines() if line.startswith("NodeName=")), None)
    if node is None:
        raise Unavailable(f"`slurmd -C` printed no node line: {reported!r}")
    host = node.split()[0].removeprefix("NodeName=")
    return CONF_TEMPLATE.format(
        host=host, root=ROOT, node=node, ctld_port=CTLD_PORT, slurmd_port=SLURMD_PORT, kill_wait=KILL_WAIT
    )


def _start_slurm(conf: str) -> None:
    for name in ("state", "spool"):
        shutil.rmtree(ROOT / name, ignore_errors=True)  # jobs of an earlier cluster are not this one's
        (ROOT / name).mkdir()
    CONF.write_text(conf, encoding="utf-8")
    daemon_env = {**_daemon_env(), "SLURM_CONF": str(CONF)}
    _run(["slurmctld", "-f", str(CONF)], env=daemon_env)
    _run(["nice", "-n", str(JOB_NICE), "slurmd", "-f", str(CONF)], env=daemon_env)
    try:
        _wait(lambda: _node_state() is not None, "slurmctld to answer", 30)
        _wait(lambda: _node_state() == "idle", "the node to be idle", 30)
    except Unavailable as exc:
        raise Unavailable(f"{exc}; see {ROOT}/slurmctld.log and {ROOT}/slurmd.log") from None
    (ROOT / "running.conf.sha256").write_text(_digest(conf))


# -- small helpers -------------------------------------------------------------------------------


def _daemon_env() -> dict[str, str]:
    """A plain environment for daemons that outlive the tests (nothing of pytest's, nothing of a test's)."""
    keep = ("PATH", "LANG", "LC_ALL", "TZ")
    return {name: os.environ[name] for name in keep if name in os.environ} | {"HOME": "/root"}


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _running_conf() -> str | None:
    path = ROOT / "running.conf.sha256"
    return path.read_text().strip() if path.exists() else None


def _pid(name: str) -> int | None:
    try:
        pid = int((ROOT / f"{name}.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _alive(pid) else None


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _gone(pid: int) -> bool:
    return not _alive(pid)


def _daemons_alive() -> bool:
    return _pid("slurmctld") is not None and _pid("slurmd") is not None


def _node_state() -> str | None:
    """The node's state as sinfo prints it (``idle``, ``down``...), or None if slurmctld does not answer."""
    try:
        done = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%T"], env=env(), capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    state = done.stdout.strip().rstrip("*~#!%$@^-")  # flags sinfo appends (not responding, powered down...)
    return (state or None) if done.returncode == 0 else None


def _run(
    cmd: list[str], *, env: dict[str, str] | None = None, timeout: float = 60, check: bool = True
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise Unavailable(f"`{' '.join(cmd)}` exited {done.returncode}: {(done.stdout + done.stderr).strip()[-500:]}")
    return done


def _wait(condition: Callable[[], object], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise Unavailable(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def main(argv: list[str]) -> int:
    if argv[1:] == ["up"]:
        try:
            ensure(by_tests=False)
        except Unavailable as exc:
            print(f"no SLURM cluster: {exc}", file=sys.stderr)
            return 1
        print(f"SLURM cluster up: export SLURM_CONF={CONF}")
        return 0
    if argv[1:] == ["down"]:
        stop()
        _started_by_tests().unlink(missing_ok=True)
        return 0
    print(__doc__.split("\n\n")[1], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
