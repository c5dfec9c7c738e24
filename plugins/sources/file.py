"""File trigger: ``touch <output_dir>/<trigger_file_path>`` asks for a full checkpoint.

The main process looks for the file every ``check_interval`` optimizer
steps. Seeing it publishes one ``save_requested`` (reason ``file``); the file
is deleted only when every rank agreed to save (on ``save_started``), so a
failure before that keeps the request. It can be touched again any number
of times.

Anything at that path that is not a regular file (a directory, a dangling
symlink, a FIFO, a path that cannot be inspected) gets one warning per state
and is otherwise ignored: never a save on every interval, never a crash. A
trigger file already there at start-up is left from an earlier run: it is
removed with a warning instead of firing.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from contextlib import ExitStack
from pathlib import Path
from typing import Final

from ckptbus import Bus, SaveCompleted, SaveFailed, SaveRequested, SaveStarted
from ckptbus._source import RunInfo

logger = logging.getLogger("ckptbus")


class FileTrigger:
    """Polls for the trigger file on the main process. See the module docstring."""

    reason: Final = "file"
    urgent: Final = False
    """Its requests wait for the next vote: every ``check_interval`` steps (every step while signals are handled)."""

    def __init__(self, file_name: str, *, check_interval: int) -> None:
        self.file_name = file_name
        self.check_interval = check_interval
        self.bus = Bus()
        self.path = Path(file_name)
        """The trigger file: ``file_name`` inside the run's output_dir once started (an absolute name as it is)."""
        self.is_main_process = False
        self._outstanding: str | None = None  # request id published and not yet agreed on
        self._warned_state: str | None = None
        # A trigger file we could not delete: (dev, inode, mtime) it had, so it
        # does not fire again until somebody touches it again.
        self._spent: tuple[int, int, int] | None = None
        self._subscriptions = ExitStack()  # the bus receivers start connected, cancelled by close

    def start(self, bus: Bus, run: RunInfo) -> None:
        self.bus = bus
        self.path = run.output_dir / self.file_name
        self.is_main_process = run.is_main_process
        if not self.is_main_process:
            return
        # A request answered without a new save (the step was already on disk)
        # or one that failed still ends on save_completed / save_failed: forget
        # it there too, or the file would never be looked at again.
        for name in ("save_started", "save_completed", "save_failed"):
            self._subscriptions.enter_context(self.bus.subscribe(name, self._on_save_started))
        st = self._inspect()
        if st is not None:
            logger.warning(
                "ckptbus: trigger file %s was already there at start-up (left from an earlier run); "
                "removed it without saving. Touch it again to ask for a checkpoint.",
                self.path,
            )
            self._remove(st)
        elif not self.path.parent.is_dir():
            # An absolute trigger_file_path in a folder that is not there: a touch would fail, and nothing would
            # ever be seen. Said once, at start-up; the run goes on (the folder may be mounted or made later).
            logger.warning(
                "ckptbus: the folder of the trigger file %s does not exist: `touch` there fails until it does. "
                "Create it, or set dynamic_checkpoint.trigger_file_path to a file name inside output_dir",
                self.path,
            )

    def close(self) -> None:
        self._subscriptions.close()

    def poll(self, step: int) -> None:
        if not self.is_main_process or step % self.check_interval != 0 or self._outstanding is not None:
            return
        st = self._inspect()
        if st is None or self._identity(st) == self._spent:
            return
        request = SaveRequested(kind="full", reason=self.reason)
        self._outstanding = request.request_id
        logger.info("ckptbus: trigger file %s seen at step %d; asking every rank to save", self.path, step)
        self.bus.publish(request)

    def _on_save_started(self, event: SaveStarted | SaveCompleted | SaveFailed) -> None:
        """Every rank agreed to save (or the request was answered): delete the file and forget the request."""
        if self._outstanding is None or self._outstanding not in event.request_ids:
            return
        self._outstanding = None
        st = self._inspect(warn=False)
        if st is not None:
            self._remove(st)

    @staticmethod
    def _identity(st: os.stat_result) -> tuple[int, int, int]:
        return (st.st_dev, st.st_ino, st.st_mtime_ns)

    def _remove(self, st: os.stat_result) -> None:
        try:
            os.unlink(self.path)
            self._spent = None
        except FileNotFoundError:
            self._spent = None
        except OSError as exc:
            self._spent = self._identity(st)
            logger.warning(
                "ckptbus: cannot delete trigger file %s (%s); it will not fire again until it is touched again. "
                "Check the permissions of %s.",
                self.path,
                exc.strerror,
                self.path.parent,
            )

    def _inspect(self, warn: bool = True) -> os.stat_result | None:
        """The stat of the trigger if it is a regular file (or a link to one), else None (warning once per state)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if os.path.islink(self.path):
                self._warn(
                    warn,
                    "dangling",
                    f"trigger path {self.path} is a symlink to {os.readlink(self.path)!r}, which does not exist; "
                    f"ignoring it. Remove it (rm {self.path}) and touch a regular file instead.",
                )
                return None
            self._warned_state = None
            self._spent = None
            return None
        except OSError as exc:
            what_to_do = (
                f"Check the permissions of {self.path.parent}."
                if exc.errno in (errno.EACCES, errno.EPERM)
                else f"Remove it (rm {self.path}) and touch a regular file instead."
            )
            self._warn(
                warn,
                f"error:{exc.errno}",
                f"cannot inspect trigger path {self.path} ({exc.strerror}); ignoring it. {what_to_do}",
            )
            return None
        if stat.S_ISREG(st.st_mode):
            self._warned_state = None
            return st
        what = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        self._warn(
            warn,
            f"mode:{stat.S_IFMT(st.st_mode)}",
            f"trigger path {self.path} is {what}; ignoring it (it will not trigger saves). "
            f"Remove it and use `touch {self.path}` to ask for a checkpoint.",
        )
        return None

    def _warn(self, warn: bool, state: str, message: str) -> None:
        if warn and self._warned_state != state:
            logger.warning("ckptbus: %s", message)
            self._warned_state = state
