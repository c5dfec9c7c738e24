"""Preemption through a real scheduler: the job scripts of docs/schedulers.md on a one-node SLURM cluster.

The cluster is set up by ``tests/slurm_cluster.py`` (root, apt, daemons
started directly); where it cannot be, every case is skipped with the
reason. Each case submits one of the documentation's scripts, as written
there, running ``train.py`` on 2 CPU ranks, lets it train, stops it the way
a cluster would, and is judged by the checkpoint on disk, the ckptbus line
in the job's log, and no process of the job left running.

The cases of one test run are submitted together, once, whichever test
worker gets to them first (the job ids are shared through a file), so they
run side by side and the whole set takes about as long as its slowest case:
the time limits, since SLURM checks them every 30 s or so. Time limits are
cut short with ``scontrol update TimeLimit=...`` once a job trains, so a
limit is never reached before ckptbus listens. Jobs carry no marker of this
test session, so the session's leak guard leaves them to this module, which
checks them by ``SLURM_JOB_ID``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import slurm_cluster
import yaml
from leaks import OWNER_ENV
from runs import BASE_CONFIG, BIN, REPO, merge, read_jsonl

from ckptbus import CheckpointInfo, list_checkpoints
from testkit.procs import process_env, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.slurm, pytest.mark.timeout(900)]

DOC = REPO / "docs" / "schedulers.md"
SCRIPT_MARKER = re.compile(r"^<!-- slurm: (?P<name>[a-z]+) -->\s*$")
TRAINING = 480.0  # seconds a job may take to start training: 2 busy cores, several jobs starting at once, niced
FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED"})


def doc_scripts() -> dict[str, str]:
    """The job scripts of docs/schedulers.md: each fenced block right after a ``<!-- slurm: NAME -->`` line."""
    lines = DOC.read_text(encoding="utf-8").splitlines()
    scripts = {}
    for i, line in enumerate(lines):
        marker = SCRIPT_MARKER.match(line)
        if marker is None:
            continue
        assert lines[i + 1].startswith("```"), f"{DOC}:{i + 1}: a slurm marker must be right before a fenced block"
        end = next(j for j in range(i + 2, len(lines)) if lines[j].startswith("```"))
        scripts[marker["name"]] = "\n".join(lines[i + 2 : end]) + "\n"
    return scripts


# -- the cases ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    script: str
    """Which script of docs/schedulers.md."""
    stop: str
    """How the job is stopped: "limit" (its time limit, cut short), "scancel ARGS", "requeue"."""
    reason: str
    """The reason the checkpoint's manifest must give."""
    logged: str
    """The ckptbus line the job's log must hold."""
    states: frozenset[str] = FINAL_STATES
    """What SLURM may record at the end."""
    sbatch: tuple[str, ...] = ()
    """Options beside the script's own (the command line wins)."""
    drop_signal: bool = False
    """Submit the script without its ``#SBATCH --signal`` line (the docs say what happens then)."""


SIGTERM_SAVED = "SIGTERM received"
EARLY = FINAL_STATES - {"TIMEOUT"}  # stopped by the signal ahead of the limit, not by the limit

CASES = {
    "signal_exec": Case("exec", "limit", "signal:SIGTERM", SIGTERM_SAVED, EARLY),
    "signal_trap": Case("trap", "limit", "signal:SIGTERM", SIGTERM_SAVED, EARLY),
    "signal_srun": Case("srun", "limit", "signal:SIGTERM", SIGTERM_SAVED, EARLY, sbatch=("--nodes=1",)),
    "time_limit": Case("exec", "limit", "signal:SIGTERM", SIGTERM_SAVED, frozenset({"TIMEOUT"}), drop_signal=True),
    "scancel_term": Case("exec", "scancel --signal=TERM --full", "signal:SIGTERM", SIGTERM_SAVED),
    "scancel_usr1": Case("exec", "scancel --signal=USR1 --batch", "launcher", "the launcher of this rank"),
    "requeue": Case("exec", "requeue", "signal:SIGTERM", SIGTERM_SAVED),
}
REFERENCE = "time_limit"
"""The uninterrupted run the resumed job is compared with: the same config, and it trains longest."""


# -- the cluster and its jobs -------------------------------------------------------------------------


@dataclasses.dataclass
class Job:
    case: str
    id: int
    dir: Path
    stopped_at: float | None = None
    """Wall time the test stopped the job (as its case says); None until then."""
    error: str | None = None
    """Why the job could not be stopped (it never trained, say)."""

    @property
    def output_dir(self) -> Path:
        return self.dir / "out"

    @property
    def log_path(self) -> Path:
        return self.dir / f"slurm-{self.id}.out"

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def log_tail(self) -> str:
        return "\n".join(self.log().replace("\r", "\n").splitlines()[-40:]) + f"\n{scontrol('show', 'job', self.id)}"

    def metrics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.output_dir / "metrics.jsonl")

    def last_step(self) -> int:
        rows = self.metrics()
        return int(rows[-1]["step"]) if rows else 0

    def info(self) -> dict[str, str]:
        """``scontrol show job`` as a dict (empty once SLURM forgot the job)."""
        text = scontrol("show", "job", "-o", self.id, check=False)
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def state(self) -> str:
        return self.info().get("JobState", "")

    def processes(self) -> list[str]:
        """The job's processes still running (SLURM's own step daemons aside)."""
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and process_env(int(entry)).get("SLURM_JOB_ID") == str(self.id):
                with contextlib.suppress(OSError):
                    stat = Path(f"/proc/{entry}/stat").read_text()
                    if stat.rsplit(")", 1)[1].split()[0] != "Z" and "slurmstepd" not in stat:
                        cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                        found.append(f"{entry}: {cmdline[:200]}")
        return found

    def wait(self, condition: Callable[[], Any], what: str, timeout: float = TRAINING) -> Any:
        def met() -> Any:
            value = condition()
            if not value and self.state() in FINAL_STATES:
                value = condition()  # the job may have ended right after doing it
                assert value, f"job {self.id} ({self.case}) ended ({self.state()}) while waiting for {what}"
            return value

        return wait_for(met, f"{what} (job {self.id}, {self.case})", timeout, interval=0.5, details=self.log_tail)

    def kill(self) -> None:
        """Cancel the job and kill what is left of it."""
        scontrol_run(["scancel", "--signal=KILL", "--full", str(self.id)])
        for line in self.processes():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(line.split(":")[0]), signal.SIGKILL)


def scontrol(*args: object, check: bool = True) -> str:
    return scontrol_run(["scontrol", *map(str, args)], check=check)


def scontrol_run(cmd: list[str], check: bool = False) -> str:
    done = subprocess.run(cmd, env=slurm_cluster.env(), capture_output=True, text=True, timeout=60, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def job_env(job_dir: Path) -> dict[str, str]:
    """What a job gets: the scripts' NPROC and CONFIG, this project's launchers on PATH, no mark of this session."""
    env = {k: v for k, v in slurm_cluster.env().items() if k != OWNER_ENV and not k.startswith(("PYTEST", "SLURM_J"))}
    env.pop("ACCELERATE_USE_CPU", None)
    env.update(
        NPROC="2",
        CONFIG=str(job_dir / "run.yaml"),
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1",
        ACCELERATE_DISABLE_RICH="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def submit(name: str, case: Case, root: Path, scripts: dict[str, str]) -> Job:
    job_dir = root / name
    job_dir.mkdir(parents=True)
    config = merge(BASE_CONFIG, {"output_dir": str(job_dir / "out")})
    (job_dir / "run.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    script = scripts[case.script]
    if case.drop_signal:
        script = re.sub(r"^#SBATCH --signal=.*\n", "", script, flags=re.MULTILINE)
    (job_dir / "job.sbatch").write_text(script, encoding="utf-8")
    # --time: a cap for a job whose test never ran (the scripts ask for 24 h); each case cuts it as it needs.
    cmd = ["sbatch", "--parsable", "--time=15", f"--job-name=ckptbus-{name}", f"--chdir={REPO}"]
    cmd.append(f"--output={job_dir}/slurm-%j.out")
    done = subprocess.run(
        [*cmd, *case.sbatch, str(job_dir / "job.sbatch")],
        env=job_env(job_dir),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"sbatch of {name} failed: {done.stderr}"
    return Job(name, int(done.stdout.strip().split(";")[0]), job_dir)


@pytest.fixture(scope="module")
def cluster() -> None:
    try:
        slurm_cluster.ensure()
    except slurm_cluster.Unavailable as exc:
        pytest.skip(f"no SLURM cluster here: {exc}")


@pytest.fixture(scope="module")
def jobs(cluster: None, request: pytest.FixtureRequest) -> dict[str, Job]:
    """This test run's jobs, one per selected case, submitted together and each stopped once it trains.

    Whichever test worker comes first does it, holding a lock; the others
    wait for it and read the jobs from the file it leaves.
    """
    selected = {
        str(item.callspec.params["case"])
        for item in request.session.items
        if isinstance(item, pytest.Function) and item.module is request.module
    }
    if "requeue" in selected:
        selected.add(REFERENCE)
    run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID") or uuid.uuid4().hex
    runs = slurm_cluster.ROOT / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    record = runs / f"{run_id}.json"
    with (runs / f"{run_id}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not record.exists():
            _forget_old_runs(runs)
            scripts = doc_scripts()
            submitted = [submit(name, CASES[name], runs / run_id, scripts) for name in sorted(selected)]
            try:
                drive(submitted)
            finally:
                record.write_text(json.dumps([dataclasses.asdict(j) | {"dir": str(j.dir)} for j in submitted]))
    return {d["case"]: Job(**d | {"dir": Path(d["dir"])}) for d in json.loads(record.read_text())}


def drive(submitted: list[Job]) -> None:
    """Stop each job as its case says once it trained 20 steps (ckptbus listens by then)."""
    waiting = list(submitted)
    deadline = time.monotonic() + TRAINING
    while waiting and time.monotonic() < deadline:
        for job in list(waiting):
            if job.last_step() >= 20:
                job.stopped_at = stop(job, CASES[job.case])
                waiting.remove(job)
            elif job.state() in FINAL_STATES:
                job.error = f"job {job.id} ended ({job.state()}) before it trained\n{job.log_tail()}"
                waiting.remove(job)
        time.sleep(0.5)
    for job in waiting:
        job.error = f"job {job.id} did not train 20 steps within {TRAINING:.0f} s\n{job.log_tail()}"


def _forget_old_runs(runs: Path) -> None:
    """Remove what earlier test runs left in ``runs`` (more than an hour old)."""
    for path in runs.iterdir():
        if time.time() - path.stat().st_mtime > 3600:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


@pytest.fixture
def job(jobs: dict[str, Job], case: str) -> Iterator[Job]:
    this = jobs[case]
    try:
        assert this.error is None and this.stopped_at is not None, this.error
        yield this
    finally:
        this.kill()


# -- how a job is stopped, and how it is judged --------------------------------------------------------


def seconds_of(text: str) -> int:
    """SLURM's ``[D-]HH:MM:SS`` (or ``MM:SS``) as seconds."""
    days, _, clock = text.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    return int(days or 0) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]


def cut_time_limit(job: Job, ahead: int) -> None:
    """Set the job's time limit to the first whole minute at least ``ahead`` seconds from now."""
    elapsed = seconds_of(job.info()["RunTime"])
    scontrol("update", f"JobId={job.id}", f"TimeLimit={math.ceil((elapsed + ahead) / 60)}")


def stop(job: Job, case: Case) -> float:
    """Stop ``job`` as ``case`` says; returns when (wall time) the stop was asked for."""
    at = time.time()
    if case.stop == "limit":
        # With a --signal of 120 s, a limit 55 to 115 s away makes SLURM signal at its next check (about every
        # 30 s), well before the limit. Without one, the limit comes 20 to 80 s from now (and up to 30 s late).
        cut_time_limit(job, 20 if case.drop_signal else 55)
    elif case.stop.startswith("scancel "):
        scontrol_run([*case.stop.split(), str(job.id)], check=True)
    else:
        scontrol("requeue", job.id)
    return at


def checkpoint_for(job: Job, reason: str) -> CheckpointInfo | None:
    found = [i for i in list_checkpoints(job.output_dir) if i.manifest.reason == reason]
    return found[-1] if found else None


def judge(job: Job, case: Case) -> tuple[CheckpointInfo, float, float]:
    """The checkpoint the stop produced, once the job is over and nothing of it runs; and when, after the stop,
    rank 0 asked for it (the signal came, or the rank found its launcher gone) and it was complete."""
    info = job.wait(lambda: checkpoint_for(job, case.reason), f"a checkpoint with reason {case.reason}", 240)
    assert info.manifest.kind == "full" and info.manifest.world_size == 2
    job.wait(lambda: job.state() in FINAL_STATES, "the job to end", 240)
    wait_for(lambda: not job.processes(), f"every process of job {job.id} to exit", 60, details=job.log_tail)
    assert case.logged in job.log(), job.log_tail()
    assert job.state() in case.states, job.log_tail()
    events = read_jsonl(job.output_dir / "ckptbus-events.jsonl")
    done = [e for e in events if e["event"] == "SaveCompleted" and e["path"] == str(info.path)]
    asked = min(e["requested_at"] for e in events if e["event"] == "SaveRequested" and e["reason"] == case.reason)
    assert job.stopped_at is not None
    return info, asked - job.stopped_at, done[0]["time"] - job.stopped_at


# -- the cases -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", [name for name in CASES if name != "requeue"])
def test_a_stopped_job_saves(job: Job, case: str) -> None:
    spec = CASES[case]
    info, asked, complete = judge(job, spec)
    assert job.last_step() == info.step, "the ranks trained past the checkpoint"
    print(
        f"\n{case}: job {job.id} {job.state()}; after the stop, rank 0 asked for a checkpoint at {asked:.2f} s "
        f"and checkpoint-{info.step} was complete at {complete:.2f} s"
    )


@pytest.mark.parametrize("case", ["requeue"])
def test_a_requeued_job_resumes_exactly(job: Job, case: str, jobs: dict[str, Job]) -> None:
    spec = CASES[case]
    info = job.wait(lambda: checkpoint_for(job, spec.reason), "the checkpoint of the requeue", 240)
    assert spec.logged in job.log(), job.log_tail()
    print(f"\nrequeue: job {job.id}, checkpoint at step {info.step}")
    # A requeued job waits before it may start again (BeginTime); let it go now.
    job.wait(lambda: job.state() == "PENDING" and not job.processes(), "the job to be back in the queue", 240)
    scontrol("update", f"JobId={job.id}", "StartTime=now")
    resumed = f"resumed from {info.path} at step {info.step}"
    job.wait(lambda: resumed in job.log(), "the requeued job to resume")
    job.wait(lambda: job.last_step() >= info.step + 10, "ten steps after the resume")
    reference = jobs[REFERENCE]
    reference.wait(lambda: reference.last_step() >= info.step + 10, "the reference run to pass those steps", 600)
    mine = {r["step"]: r["loss"] for r in job.metrics() if info.step < r["step"] <= info.step + 10}
    theirs = {r["step"]: r["loss"] for r in reference.metrics() if info.step < r["step"] <= info.step + 10}
    assert len(mine) == 10 and mine == theirs, "the resumed losses differ from an uninterrupted run's"
    scontrol_run(["scancel", str(job.id)], check=True)
    job.wait(lambda: job.state() in FINAL_STATES, "the job to end", 240)
    wait_for(lambda: not job.processes(), f"every process of job {job.id} to exit", 60, details=job.log_tail)
