"""Launcher watch: ranks never outlive the process that launched them.

Under ``accelerate launch`` and ``torchrun`` the ranks are children of the
launcher (torchrun's elastic agent) and sit in process groups of their own.
When the launcher dies without shutting them down (SIGKILL, a crash,
``scancel --signal=USR1 --batch`` killing it by SIGUSR1's default action, an
out-of-memory kill), nobody stops the ranks: they are adopted by init and go
on training outside the job, and nothing saves what they learned.

**Who the launcher is.** torch's elastic agent (``torchrun``, ``accelerate
launch``) starts every rank as its own child and exports no pid of its own
(torch 2.13 sets ``TORCHELASTIC_RUN_ID``, ``TORCHELASTIC_RESTART_COUNT``,
``TORCHELASTIC_USE_AGENT_STORE``, ``TORCHELASTIC_ERROR_FILE`` and the ranks'
numbers, nothing naming the agent). So the launcher is the parent this
process had when this module was first imported (:func:`launcher_pid`,
read at import: ``train.py`` imports it before torch, a fraction of a second
after the launcher started the rank), not whoever is the parent when the
run's checkpointing starts, which may be init after the launcher died while
the ranks loaded the model. A parent that is PID 1 at import is taken as
the launcher only when it is a Python program (``accelerate launch`` or
``torchrun`` made PID 1 of a container with ``exec``): init, ``tini`` or the
like adopted a rank whose launcher was already gone.

**Gone before the run started.** :func:`exit_if_launcher_gone` (``train.py``
calls it before torch is imported and again before the process group is
joined, and :meth:`LauncherWatch.start` calls it) ends a rank whose launcher
is already gone with one line and status 1, having saved nothing: an orphan
must not join a process group (its launcher's port may by now belong to
another run, whose ranks it would meet there) nor take the output_dir's lock.

**Gone during the run.** At every optimizer-step boundary
:meth:`LauncherWatch.poll` compares ``os.getppid()`` with the launcher.
Once it changed, it publishes one ``SaveRequested(kind, reason="launcher",
exit_after=True)`` and logs one warning. With signals on (the default) the
ranks vote at every step, so every rank saves the same step within a step or
two of the first rank that noticed, and stops; with signals off they vote
every ``check_interval`` steps, and the save comes at the next of those. The
watch does not make the ranks vote at every step by itself (it is not
``urgent``): that would move where requests of other sources land in runs
that turned signals off. A run that is already stopping (a request
to save and exit was seen on this rank) is left to finish as it was asked.

Only a rank that was started by a launcher is watched: one of several ranks,
or a process started by torchrun's agent or by ``accelerate launch`` (they set
:data:`LAUNCHER_ENV`). ``python train.py`` alone is not: its parent is a shell,
and a shell that exits under ``nohup`` must not stop the run. The launcher
must be the rank's parent: a wrapper script between them should ``exec``.

When the launcher is gone, the rank's stdout and stderr may be pipes that
nobody reads any more (``accelerate launch ... | tee log`` killed as a
whole). Python ignores SIGPIPE, so the next ``print`` or progress-bar update
would raise ``BrokenPipeError`` in whatever code writes and end the rank
before it saves. Such pipes are pointed at ``/dev/null`` when the launcher is
found gone, and at every step after that until the run ends (the reader may
die a moment after the launcher); output that has a reader keeps it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import stat
import time
from collections.abc import Mapping
from contextlib import ExitStack
from typing import Final

from ckptbus import Bus, SaveCompleted, SaveFailed, SaveKind, SaveRequested, SaveStarted
from ckptbus._events import SAVE_KINDS
from ckptbus._source import RunInfo

logger = logging.getLogger("ckptbus")

LAUNCHER_ENV: Final = ("TORCHELASTIC_RUN_ID", "ACCELERATE_DYNAMO_BACKEND")
"""Set for every process it starts by torchrun's agent (``accelerate launch`` with several processes,
``torchrun``) and by ``accelerate launch`` with one process."""

_STDIO: Final = (1, 2)

_launcher_pid = os.getppid()
"""This process's parent when this module was first imported (or when this process was forked from one that had
imported it): its launcher, if a launcher started it. Read it with :func:`launcher_pid`."""


def _note_parent_after_fork() -> None:
    global _launcher_pid
    _launcher_pid = os.getppid()  # the process that forked this one: the child inherited the parent's value


os.register_at_fork(after_in_child=_note_parent_after_fork)


def launcher_pid() -> int:
    """The pid of this process's launcher, as seen when this module was first imported in this process."""
    return _launcher_pid


_LAUNCHER_PROGRAMS: Final = ("python", "torchrun", "accelerate", "deepspeed")
"""How the first words of a launcher's command line begin (its interpreter, or its script run directly)."""


def launched(run: RunInfo, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether a launcher started this rank: the run has several ranks, or a known launcher's variable is set."""
    return run.world_size > 1 or launched_by_environment(environ)


def launched_by_environment(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the environment says a launcher started this process (before any process group exists)."""
    try:
        several = int(environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        several = False
    return several or any(name in environ for name in LAUNCHER_ENV)


def launcher_gone(launcher: int | None = None) -> str | None:
    """Why this process's ``launcher`` is gone (one clause), or None while it is its parent.

    Gone: the parent changed since ``launcher`` was seen, or ``launcher`` is
    PID 1 and not a Python program (init adopted this process before
    ckptbus was imported). A PID 1 that cannot be read counts as a launcher:
    a run is not ended on a guess.
    """
    if launcher is None:
        launcher = _launcher_pid
    parent = os.getppid()
    if parent != launcher:
        return f"the launcher of this rank (pid {launcher}) is gone (the parent is now pid {parent})"
    if launcher == 1 and not _runs_python(1):
        return f"this rank's parent is pid 1 ({_program(1)}), not a launcher: its launcher was gone already"
    return None


def exit_if_launcher_gone(environ: Mapping[str, str] = os.environ, *, world_size: int = 1) -> None:
    """End this process, with one line on standard error and status 1, if a launcher started it and is gone.

    Call it before joining a process group: an orphan must save nothing and
    meet nobody. Does nothing for a process no launcher started
    (``python train.py``), whose parent may come and go.
    """
    if not (world_size > 1 or launched_by_environment(environ)):
        return
    why = launcher_gone()
    if why is None:
        return
    rank = environ.get("RANK", "?")
    message = f"ckptbus: {why} before training started; rank {rank} saves nothing and exits (status 1)\n"
    with contextlib.suppress(OSError):
        os.write(2, message.encode())
    # No unwinding: whatever this process holds (a half-made process group, a lock) ends with it, and no
    # collective or teardown can wait for peers that will never come.
    os._exit(1)


def _command(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return [word.decode(errors="replace") for word in fh.read().split(b"\0") if word]
    except OSError:
        return []


def _program(pid: int) -> str:
    words = _command(pid)
    return os.path.basename(words[0]) if words else "unknown"


def _runs_python(pid: int) -> bool:
    """Whether ``pid`` runs a Python launcher (True when its command line cannot be read)."""
    words = _command(pid)
    if not words:
        return True
    return any(os.path.basename(word).startswith(_LAUNCHER_PROGRAMS) for word in words[:2])


class LauncherWatch:
    """Asks every rank to save and stop once this rank's launcher is gone. See the module docstring.

    ``kind`` is what is saved: ``full`` (resumable, the default) or
    ``weights``. Raises ``ValueError`` for another kind.
    """

    reason: Final = "launcher"
    urgent: Final = False
    """Answered at the next vote: every step with signals on (the default), else every ``check_interval`` steps."""

    def __init__(self, kind: SaveKind = "full") -> None:
        if kind not in SAVE_KINDS:
            raise ValueError(f"kind must be one of {SAVE_KINDS}, got {kind!r}")
        self.kind: SaveKind = kind
        self._bus: Bus | None = None
        self._parent: int | None = None  # the launcher's pid; None: nothing is watched
        self._stopping = False  # a request to save and stop was seen: the run ends anyway
        self._noticed_at: float | None = None  # wall time the launcher was found gone
        self._request_id: str | None = None
        self._subscriptions = ExitStack()  # the bus receivers start connected, cancelled by close

    @property
    def watching(self) -> bool:
        """Whether this rank's launcher is being watched (started, launched by a launcher, not yet gone)."""
        return self._parent is not None and self._noticed_at is None

    @property
    def launcher_gone(self) -> bool:
        """Whether this rank found its launcher gone."""
        return self._noticed_at is not None

    # -- TriggerSource -------------------------------------------------------

    def start(self, bus: Bus, run: RunInfo) -> None:
        if self._bus is not None:
            return  # started already
        self._bus = bus
        if not launched(run):
            logger.debug("ckptbus: no launcher started this process; its parent (pid %d) is not watched", os.getppid())
            return
        exit_if_launcher_gone(world_size=run.world_size)  # gone while the ranks loaded the model: no save
        self._parent = _launcher_pid
        for name in ("save_requested", "save_started"):
            self._subscriptions.enter_context(bus.subscribe(name, self._note_stop))
        for name in ("save_completed", "save_failed"):
            self._subscriptions.enter_context(bus.subscribe(name, self._on_save_done))

    def poll(self, step: int) -> None:
        if self.launcher_gone:
            # The reader of the output may die a moment after the launcher (a pipeline killed as a whole):
            # keep looking until the run ends.
            _quiet_broken_stdio()
            return
        if self._parent is None or os.getppid() == self._parent:
            return
        self._noticed_at = time.time()
        replaced = _quiet_broken_stdio()  # before logging: the warning itself may go to a broken pipe
        if self._stopping:
            logger.warning(
                "ckptbus: the launcher of this rank (pid %s) is gone; the run is already saving and stopping as "
                "it was asked",
                self._parent,
            )
            return
        request = SaveRequested(kind=self.kind, reason=self.reason, exit_after=True, requested_at=self._noticed_at)
        self._request_id = request.request_id
        logger.warning(
            "ckptbus: the launcher of this rank (pid %s) is gone (the parent is now pid %d) at step %d; every rank "
            "saves a %s checkpoint at the next vote and stops%s",
            self._parent,
            os.getppid(),
            step,
            self.kind,
            f" (nothing reads its {' and '.join(replaced)} any more: sent to {os.devnull})" if replaced else "",
        )
        assert self._bus is not None
        self._bus.publish(request)

    def close(self) -> None:
        self._bus = None
        self._subscriptions.close()

    # -- receivers (``save_requested`` may come on any thread: it only sets an attribute) --------

    def _note_stop(self, event: SaveRequested | SaveStarted) -> None:
        if event.exit_after and not (isinstance(event, SaveRequested) and event.request_id == self._request_id):
            self._stopping = True

    def _on_save_done(self, event: SaveCompleted | SaveFailed) -> None:
        if self._noticed_at is None:
            return
        _quiet_broken_stdio()  # published on the training thread, right before the last lines a stopping run writes
        if self._request_id is None or self._request_id not in event.request_ids:
            return
        after = time.time() - self._noticed_at
        if isinstance(event, SaveCompleted):
            logger.info(
                "ckptbus: launcher gone: %s checkpoint %s complete %.2f s after this rank noticed "
                "(writing took %.2f s)",
                event.kind,
                event.path,
                after,
                event.seconds,
            )
        else:
            logger.warning(
                "ckptbus: launcher gone: the checkpoint at step %d failed %.2f s after this rank noticed: %s",
                event.step,
                after,
                event.error,
            )


def _quiet_broken_stdio() -> list[str]:
    """Point stdout and stderr at /dev/null where they are pipes or sockets nobody reads; the names of those."""
    replaced = []
    for fd in _STDIO:
        if _reader_gone(fd):
            null = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(null, fd)
            finally:
                os.close(null)
            replaced.append("stdout" if fd == 1 else "stderr")
    return replaced


def _reader_gone(fd: int) -> bool:
    """Whether ``fd`` is a pipe or socket whose other end is closed (a write would fail with EPIPE)."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False  # closed: nothing writes there
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
        return False  # a file or a terminal: writes still work (a hung-up terminal gives EIO, which tqdm handles)
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    # Linux reports POLLERR on the write end of a pipe without readers, POLLHUP on a socket whose peer is gone.
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
