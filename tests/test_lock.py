"""One run per output_dir: the lock (ckptbus/_lock.py), in real processes, and a second real training run refused.

Holders are real processes (a child that takes the lock and waits), killed
for real with SIGKILL; the lock is the kernel's fcntl lock. What cannot run
here: a second machine on a shared filesystem (NFS carries the same fcntl
locks; not tested).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from runs import REPO, TrainingRun

from ckptbus import CheckpointConfig, SetupError
from ckptbus._lock import Holder, acquire, holder_of
from ckptbus._names import LOCK_NAME
from testkit.procs import wait_for

HOLDER = """
import sys
from ckptbus._lock import acquire
lock = acquire(sys.argv[1])
print("held", flush=True)
sys.stdin.read()          # until the test closes our stdin (or kills us)
lock.release()
print("released", flush=True)
"""


@contextlib.contextmanager
def holder(directory: Path) -> Iterator[subprocess.Popen[str]]:
    """A child process holding ``directory``'s lock until the block ends (or the test kills it)."""
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(directory)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "held", child.stderr.read() if child.stderr else ""
        yield child
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=30)
        for stream in (child.stdin, child.stdout, child.stderr):
            if stream is not None:
                stream.close()


def test_a_second_process_is_refused_with_the_holders_host_pid_and_start(tmp_path: Path) -> None:
    with holder(tmp_path) as child:
        with pytest.raises(SetupError) as refused:
            acquire(tmp_path)
        message = str(refused.value)
        assert f"output_dir '{tmp_path}' is in use by another run" in message
        assert f"pid {child.pid} on host {socket.gethostname()}, running since 20" in message
        assert "Wait for that run to end or stop it, or give this run another output_dir" in message
        found = holder_of(tmp_path)
        assert found is not None and found.pid == child.pid


def test_a_holder_killed_with_sigkill_blocks_nobody(tmp_path: Path) -> None:
    with holder(tmp_path) as child:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
        stale = holder_of(tmp_path)
        assert stale is not None and stale.pid == child.pid, "the dead holder's line is still in the file"
        lock = acquire(tmp_path)  # the kernel dropped the lock with the process
        try:
            assert lock.exclusive and holder_of(tmp_path) == lock.holder
            assert lock.holder.pid == os.getpid()
        finally:
            lock.release()


def test_release_frees_the_directory_and_blanks_the_holder(tmp_path: Path) -> None:
    with holder(tmp_path) as child:
        assert child.stdin is not None
        child.stdin.close()
        assert child.stdout is not None and child.stdout.readline().strip() == "released"
        child.wait(timeout=30)
    assert (tmp_path / LOCK_NAME).read_text() == "", "a clean exit leaves no holder named"
    assert holder_of(tmp_path) is None
    lock = acquire(tmp_path)
    lock.release()
    lock.release()  # twice is fine


def test_the_same_directory_twice_in_one_process_is_refused(tmp_path: Path) -> None:
    lock = acquire(tmp_path)
    try:
        # fcntl would grant it (one process's locks never conflict): refused by the process's own record.
        with pytest.raises(SetupError, match="already in use by another run in this process"):
            acquire(tmp_path / ".." / tmp_path.name)
        # Asking who holds it must not open the file here: closing any descriptor would drop the lock.
        assert holder_of(tmp_path) == lock.holder
        refused = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from ckptbus._lock import acquire; acquire(sys.argv[1])",
                str(tmp_path),
            ],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=60,
        )
        assert refused.returncode != 0 and f"pid {os.getpid()}" in refused.stderr, refused.stderr
    finally:
        lock.release()
    acquire(tmp_path).release()


def test_holder_line_round_trips() -> None:
    me = Holder.me()
    assert Holder.parse(json.dumps({"host": me.host, "pid": me.pid, "started": me.started})) == Holder(
        me.host, me.pid, me.started, ""
    )
    assert Holder.parse("") is None and Holder.parse("{}") is None and Holder.parse("[1]") is None


def test_the_runtime_takes_the_lock_at_start_and_releases_it_at_shutdown(tmp_path: Path) -> None:
    from ckptbus.plugins.distributed import Ranks
    from ckptbus.plugins.runtime import Runtime
    from ckptbus.plugins.saving.trainer_sink import TrainerSink

    def started() -> Runtime:
        runtime = Runtime(CheckpointConfig(output_dir=str(tmp_path)), TrainerSink())
        runtime.start(Ranks())
        return runtime

    first = started()
    with pytest.raises(SetupError, match="in use by another run"):
        started()
    first.shutdown("training ended")
    second = started()
    second.shutdown("training ended")


# -- real runs ------------------------------------------------------------------------------------

Launch = Callable[..., TrainingRun]


@pytest.mark.slow
def test_a_second_training_run_on_a_live_output_dir_is_refused_and_the_first_goes_on(
    launch: Launch, tmp_path: Path
) -> None:
    first = launch(processes=2, config={"dynamic_checkpoint": {"enabled": True}}, name="first")
    ranks = first.wait_for_ranks()
    first.wait_for_step(3)
    second = launch(
        processes=1,
        launcher="python",
        config={"output_dir": str(first.output_dir), "max_steps": 5, "dynamic_checkpoint": {"enabled": True}},
        name="second",
    )
    assert second.wait_exit(timeout=180) == 2, second.log_tail()
    log = second.log()
    assert f"is in use by another run (pid {ranks[0]} on host {socket.gethostname()}, running since" in log, log
    assert "Traceback" not in log
    # The first run is untouched: it trains on, alone in its metrics.
    at_refusal = first.last_step()
    first.wait_for_step(at_refusal + 5)
    steps = [row["step"] for row in first.metrics()]
    assert steps == list(range(1, len(steps) + 1)), "only the first run wrote metrics"

    # Killed outright, the first run holds nothing: the next run starts.
    first.kill()
    third = launch(
        processes=1,
        launcher="python",
        config={"output_dir": str(first.output_dir), "max_steps": 2, "dynamic_checkpoint": {"enabled": False}},
        name="third",
    )
    assert third.wait_exit(timeout=180) == 0, third.log_tail()
    wait_for(lambda: (first.output_dir / LOCK_NAME).read_text() == "", "the lock file blanked at exit", 10)


# -- what stands at ckptbus.lock: only a regular file of its own is written (issue 24) -------------


def _symlink_to_outside(directory: Path, outside: Path) -> None:
    (directory / LOCK_NAME).symlink_to(outside)


def _dangling_symlink(directory: Path, outside: Path) -> None:
    (directory / LOCK_NAME).symlink_to(outside.with_name("missing"))


def _directory(directory: Path, outside: Path) -> None:
    (directory / LOCK_NAME).mkdir()


def _fifo(directory: Path, outside: Path) -> None:
    os.mkfifo(directory / LOCK_NAME)


def _hard_link_to_outside(directory: Path, outside: Path) -> None:
    os.link(outside, directory / LOCK_NAME)


@pytest.mark.parametrize(
    ("make", "what"),
    [
        (_symlink_to_outside, "a symbolic link"),
        (_dangling_symlink, "a symbolic link"),
        (_directory, "a directory"),
        (_fifo, "a FIFO"),
        (_hard_link_to_outside, "a file with 2 hard links (it may be a file outside output_dir)"),
    ],
    ids=["symlink", "dangling-symlink", "directory", "fifo", "hard-link"],
)
def test_a_lock_path_that_is_not_a_regular_file_is_refused_and_nothing_outside_is_written(
    tmp_path: Path, make: Callable[[Path, Path], None], what: str
) -> None:
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me\n")
    make(output_dir, outside)
    path = output_dir / LOCK_NAME
    with pytest.raises(SetupError) as refused:
        acquire(output_dir)
    message = str(refused.value)
    assert message.startswith(f"the lock file {path} is {what}, not the regular file ckptbus keeps there"), message
    assert f"Remove it (rm -r {path}) if no run uses this output_dir, and start again" in message
    assert outside.read_text() == "keep me\n", "nothing outside output_dir was truncated or written"
    assert holder_of(output_dir) is None, "naming the holder reads nothing through it either (and does not block)"
    # Nothing was left held: once the path is cleared, the directory can be locked.
    if path.is_dir() and not path.is_symlink():
        path.rmdir()
    else:
        path.unlink()
    acquire(output_dir).release()
    assert outside.read_text() == "keep me\n"


def test_the_runtime_refuses_a_lock_path_that_is_a_directory(tmp_path: Path) -> None:
    """Before, a directory there was a warning and both runs trained at once in one output_dir."""
    from ckptbus.plugins.distributed import Ranks
    from ckptbus.plugins.runtime import Runtime
    from ckptbus.plugins.saving.trainer_sink import TrainerSink

    (tmp_path / LOCK_NAME).mkdir()
    runtime = Runtime(CheckpointConfig(output_dir=str(tmp_path)), TrainerSink())
    with pytest.raises(SetupError, match="is a directory, not the regular file ckptbus keeps there"):
        runtime.start(Ranks())


@pytest.mark.slow
def test_train_py_exits_2_naming_a_lock_path_that_is_a_symlink(tmp_path: Path) -> None:
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me\n")
    (output_dir / LOCK_NAME).symlink_to(outside)
    config = tmp_path / "run.yaml"
    config.write_text(f"output_dir: {output_dir}\nmax_steps: 2\n", encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"the lock file {output_dir / LOCK_NAME} is a symbolic link" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert outside.read_text() == "keep me\n"
