"""Real training runs (``accelerate launch`` or ``python train.py``) and ranks started one by one, from tests.

Every run gets its own free port, its own session and output directory, and
is killed with its whole process tree (torchrun's workers sit in their own
process groups) when the test ends. Tests wait on conditions, never on
fixed sleeps.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from testkit.procs import descendants, free_port, process_env, wait_for

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DEFAULT_TIMEOUT = 120.0

# Small and quick: about 50 optimizer steps a second with 2 ranks on 2 cores.
BASE_CONFIG: dict[str, Any] = {
    "max_steps": 100000,
    "seed": 42,
    "micro_batch_size": 4,
    "sequence_len": 16,
    "dataset_size": 256,
    "model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "vocab_size": 32},
    "dynamic_checkpoint": {"enabled": True, "check_interval": 5},
}

CHECKPOINTS_AT_4_AND_8: dict[str, Any] = {
    "dataset_size": 64,
    "micro_batch_size": 4,
    "sequence_len": 16,
    "max_steps": 8,
    "save_steps": 4,
    "dynamic_checkpoint": {"enabled": False},
}
"""A run with full checkpoints at steps 4 and 8 and no trigger: the reference several test files copy, damage and
resume from (with :func:`finished_run`, one run for all of them)."""

TWELVE_STEPS: dict[str, Any] = {
    "max_steps": 12,
    "warmup_steps": 4,
    "learning_rate": 1e-3,
    "save_steps": 6,
    "dynamic_checkpoint": {"async_save": False},
}
"""12 steps with a warm-up and full checkpoints at 6 and 12, saved synchronously: tests/test_lr_schedule.py reads
its learning rates, tests/test_parallel_writers.py its digests; on 2 ranks, one run for both (:func:`finished_run`)."""


def accelerate_launch(script: Path | str, *args: str, processes: int = 2, module: bool = False) -> list[str]:
    """``accelerate launch`` of ``script`` with ``args`` on ``processes`` CPU ranks (``--multi_gpu`` from 2),
    on a free port. ``module``: ``script`` is a module name, run as ``python -m`` would (``-m benchmarks.x``)."""
    multi = ["--multi_gpu"] if processes > 1 else []
    return [
        str(BIN / "accelerate"),
        "launch",
        *multi,
        "--num_processes",
        str(processes),
        "--main_process_port",
        str(free_port()),
        *(["-m"] if module else []),
        str(script),
        *args,
    ]


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    result = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merge(result[key], value)
        else:
            result[key] = value
    return result


class TrainingRun:
    """One training run in a subprocess. Use through the ``launch`` fixture."""

    def __init__(
        self,
        workdir: Path,
        *,
        processes: int = 2,
        config: dict[str, Any] | None = None,
        launcher: str = "accelerate",
        extra_args: list[str] | None = None,
        name: str = "run",
        raw_config: bool = False,
        env: dict[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.extra_env = dict(env or {})
        self.output_dir = workdir / "out"
        cfg = dict(config or {}) if raw_config else merge(BASE_CONFIG, config or {})
        cfg.setdefault("output_dir", str(self.output_dir))
        self.output_dir = Path(cfg["output_dir"])
        self.config = cfg
        self.config_path = workdir / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
        self.log_path = workdir / f"{name}.log"
        self.processes = processes
        if launcher == "python":
            cmd = [sys.executable, str(REPO / "train.py")]
        else:
            cmd = accelerate_launch(REPO / "train.py", processes=processes)
        self.cmd = [*cmd, "--config", str(self.config_path), *(extra_args or [])]
        self.proc: subprocess.Popen[bytes] | None = None
        self.exit_status: int | None = None
        """The status of a run that ended before this object was made (:func:`finished_run`); else None."""

    # -- process ------------------------------------------------------------

    def start(self, command: Sequence[str] | None = None, *, cwd: Path | None = None) -> TrainingRun:
        """Start the run: train.py on this run's config, or ``command``, a whole command line of its own.

        ``command`` is given here, once the run exists, because it usually
        names this run's ``config_path`` or ``output_dir``. ``cwd``: where it
        runs (default: the run's ``workdir``); the repository root for a
        module of it (``python -m benchmarks.x``).
        """
        if command is not None:
            self.cmd = list(command)
        env = dict(os.environ)
        env.update(
            {
                "PYTHONUNBUFFERED": "1",
                "OMP_NUM_THREADS": "1",
                "TOKENIZERS_PARALLELISM": "false",
                "HF_HUB_OFFLINE": "1",
                "ACCELERATE_DISABLE_RICH": "1",
            }
        )
        env.pop("ACCELERATE_USE_CPU", None)
        env.update(self.extra_env)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - held open for the run's lifetime, closed in kill()
        self.proc = subprocess.Popen(
            self.cmd,
            cwd=cwd or self.workdir,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def worker_pids(self) -> list[int]:
        """The processes running train.py (the ranks); the launcher is not one of them."""
        pids = []
        for pid in [self.pid, *descendants(self.pid)]:
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(arg.endswith(b"train.py") for arg in argv) and b"launch" not in argv:
                pids.append(pid)
        return sorted(pids)

    def wait_exit(self, timeout: float = DEFAULT_TIMEOUT) -> int:
        if self.proc is None and self.exit_status is not None:
            return self.exit_status
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"run did not exit within {timeout} s\n{self.log_tail()}") from None

    def kill(self) -> None:
        """SIGKILL the launcher and every process below it."""
        if self.proc is None:
            return
        for pid in [*descendants(self.pid), self.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._log.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- what the run wrote -------------------------------------------------

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log().replace("\r", "\n").splitlines()[-lines:])

    def metrics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.output_dir / "metrics.jsonl")

    def events(self) -> list[dict[str, Any]]:
        return read_jsonl(self.output_dir / "ckptbus-events.jsonl")

    def last_step(self) -> int:
        rows = self.metrics()
        return int(rows[-1]["step"]) if rows else 0

    def wait_for(
        self,
        condition: Callable[[], Any],
        what: str,
        timeout: float = DEFAULT_TIMEOUT,
        allow_exit: bool = False,
        interval: float = 0.05,
    ) -> Any:
        """Poll ``condition`` until it returns something truthy; fail with the log if the run dies first."""

        def met() -> Any:
            value = condition()
            if not value and not allow_exit and not self.alive():
                raise AssertionError(
                    f"run exited ({self.proc and self.proc.returncode}) while waiting for {what}\n{self.log_tail()}"
                )
            return value

        return wait_for(met, what, timeout, interval=interval, details=self.log_tail)

    def wait_for_step(self, step: int, timeout: float = DEFAULT_TIMEOUT) -> int:
        return int(self.wait_for(lambda: self.last_step() >= step and self.last_step(), f"step {step}", timeout))

    def rank_pids(self) -> dict[int, int]:
        """``{global rank: pid}`` of the ranks running now (from each worker's ``RANK`` environment variable)."""
        ranks: dict[int, int] = {}
        for pid in self.worker_pids():
            rank = process_env(pid).get("RANK", "0" if self.processes == 1 else "")
            if rank.isdigit():
                ranks[int(rank)] = pid
        return ranks

    def wait_for_ranks(self, count: int | None = None, timeout: float = DEFAULT_TIMEOUT) -> dict[int, int]:
        """Wait until ``count`` ranks (default: ``processes``) run; return :meth:`rank_pids`."""
        want = self.processes if count is None else count
        return dict(self.wait_for(lambda: len(self.rank_pids()) >= want and self.rank_pids(), f"{want} ranks", timeout))


def finished_run(
    root: Path, *, processes: int = 2, config: dict[str, Any], name: str = "shared", timeout: float = 300.0
) -> TrainingRun:
    """A run of train.py that exited 0, done once for every test that asks for the same ``processes`` and
    ``config`` (merged with :data:`BASE_CONFIG`) under ``root``, across pytest-xdist's workers too.

    For runs that tests only read: a reference whose losses resumed runs must repeat (training is deterministic
    on CPU, as the exact-resume tests prove), or checkpoints they copy before damaging them. The first test to
    ask starts the run and waits for its end holding a lock; the others wait on that lock and get the same
    finished run (its ``output_dir``, ``metrics()``, ``log()``; ``wait_exit()`` returns 0 at once). ``root``
    is :func:`shared_dir`'s. A run that did not exit 0 fails every test that asked for it, with its log.
    """
    cfg = merge(BASE_CONFIG, config)
    key = hashlib.sha256(json.dumps([processes, cfg], sort_keys=True).encode()).hexdigest()[:16]
    workdir = root / f"{name}-{key}"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{name}-{key}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed, and by the kernel if this dies
        status = workdir / "exit-status"
        if not status.exists():
            shutil.rmtree(workdir, ignore_errors=True)  # what a worker that died mid-run left
            workdir.mkdir()
            run = TrainingRun(workdir, processes=processes, config=cfg, name=name, raw_config=True).start()
            try:
                code = run.wait_exit(timeout)
            except AssertionError:
                code = -1  # did not exit in time: killed below, and a failure for everyone who asks
            finally:
                run.kill()
            status.write_text(str(code), encoding="utf-8")
    run = TrainingRun(workdir, processes=processes, config=cfg, name=name, raw_config=True)
    code = run.exit_status = int(status.read_text(encoding="utf-8"))
    assert code == 0, f"the shared run in {workdir} exited with {code} (-1: not within {timeout} s)\n{run.log_tail()}"
    return run


def shared_dir(basetemp: Path) -> Path:
    """Where :func:`finished_run` keeps runs for this whole pytest session: every pytest-xdist worker has its
    own ``basetemp`` inside the session's (``<session>/gw0``), so the workers share its parent."""
    session = basetemp.parent if os.environ.get("PYTEST_XDIST_WORKER") else basetemp
    return session / "shared-runs"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    rows = []
    for line in text.splitlines():
        if line.endswith("}"):
            with contextlib.suppress(json.JSONDecodeError):  # a line being written
                rows.append(json.loads(line))
    return rows


# -- ranks started one by one, without a launcher --------------------------------------


@dataclass
class Rank:
    returncode: int | None
    output: str
    result: dict[str, Any] | None


def run_ranks(
    tmp_path: Path,
    script: Path,
    *args: str,
    world_size: int = 2,
    name: str | None = None,
    env: dict[str, str] | None = None,
    wrap: dict[int, list[str]] | None = None,
    unreaped: frozenset[int] = frozenset(),
    timeout: float = 60.0,
) -> list[Rank]:
    """Run ``world_size`` ranks of ``script`` over gloo until all exit; their results and outputs.

    Each rank runs ``python script *args RESULT`` with the environment of a
    torchrun worker on 127.0.0.1 (``RANK``, ``WORLD_SIZE``, ...), in its own
    session, its output in ``<name>-rank<r>.log``; ``RESULT`` is
    ``<name>-rank<r>.json`` in ``tmp_path``, read back if the rank wrote it.

    ``wrap[rank]`` is a command line put before that rank's ``python``. The
    ranks are reaped as soon as they exit (a rank that is gone must not stay
    a zombie the others still see), except those in ``unreaped``: they are
    reaped only once every other rank has exited, like a launcher that waits
    for its ranks in order. Ranks that outlive ``timeout`` are killed with
    their process groups.
    """
    name = name or (args[0] if args else script.stem)
    port = free_port()
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []
    try:
        for rank in range(world_size):
            rank_env = dict(os.environ)
            rank_env.pop("ACCELERATE_USE_CPU", None)
            rank_env.pop("CKPTBUS_VOTES", None)
            rank_env.update(
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE=str(world_size),
                LOCAL_WORLD_SIZE=str(world_size),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                OMP_NUM_THREADS="1",
            )
            rank_env.update(env or {})
            log = tmp_path / f"{name}-rank{rank}.log"
            logs.append(log)
            command = [*(wrap or {}).get(rank, []), sys.executable, str(script), *args]
            command.append(str(tmp_path / f"{name}-rank{rank}.json"))
            with log.open("wb") as out:
                procs.append(
                    subprocess.Popen(
                        command, cwd=REPO, env=rank_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                    )
                )

        def all_exited() -> bool:
            # Poll every rank each time (any() would stop at the first one running and leave zombies).
            running = [p.poll() is None for r, p in enumerate(procs) if r not in unreaped]
            return not any(running) and all(p.poll() is not None for p in procs)

        with contextlib.suppress(AssertionError):  # the deadline passed: the ranks still running are killed below
            wait_for(all_exited, "every rank to exit", timeout, interval=0.02)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=30)
    ranks = []
    for rank, (p, log) in enumerate(zip(procs, logs, strict=True)):
        path = tmp_path / f"{name}-rank{rank}.json"
        result = json.loads(path.read_text()) if path.exists() else None
        ranks.append(Rank(p.returncode, log.read_text(errors="replace"), result))
    return ranks


def results_of(ranks: list[Rank]) -> list[dict[str, Any]]:
    """The results of ranks that all exited 0 and wrote one (else the test fails with their outputs)."""
    outputs = "\n".join(f"--- rank {r} (exit {rank.returncode}):\n{rank.output}" for r, rank in enumerate(ranks))
    assert [rank.returncode for rank in ranks] == [0] * len(ranks), outputs
    results = [rank.result for rank in ranks]
    assert all(result is not None for result in results), outputs
    for r, result in enumerate(results):
        assert result is not None and result["rank"] == r and result["world_size"] == len(ranks)
    return [result for result in results if result is not None]
