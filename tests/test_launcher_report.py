"""After Ctrl+C ckptbus says what the launcher will do, and the launcher does it, whatever accelerate's version.

accelerate launch 1.15 (constraints.txt, the suite's set-up) reports ranks
that exited with 130 with a traceback of its own and status 1; 1.16 (what
``pip install ckptbus`` resolves today) exits with 130 and no traceback.
tests/newest_versions.sh runs this file against the newest accelerate, make
test against the pinned one: the same assertions hold for both.
"""

from __future__ import annotations

import os
import re
import signal
from typing import Any

import pytest
from ckptbus.plugins.sources import signals
from ckptbus.plugins.sources.signals import launcher_report


def test_the_report_follows_the_launcher_and_its_version(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "torchrun reports with a traceback of its own and status 1" in launcher_report(2, {})
    accelerate = {"ACCELERATE_MIXED_PRECISION": "no"}
    # The version is what importlib.metadata says is installed; here it is set to each side of the change.
    monkeypatch.setattr(signals, "_accelerate_version", lambda: (1, 15, 0))
    assert launcher_report(2, accelerate).endswith(
        "accelerate launch 1.15.0 reports with a traceback of its own and status 1"
    )
    monkeypatch.setattr(signals, "_accelerate_version", lambda: (1, 16, 0))
    report = launcher_report(15, accelerate)
    assert "accelerate launch 1.16.0 passes on as its own status 143 without a traceback" in report
    monkeypatch.setattr(signals, "_accelerate_version", lambda: None)
    assert "(version unknown) reports with a traceback" in launcher_report(2, accelerate)


def test_the_installed_version_is_read() -> None:
    import accelerate

    version = signals._accelerate_version()
    assert version is not None and ".".join(map(str, version)) == accelerate.__version__.split("+")[0]


@pytest.mark.slow
def test_ctrl_c_the_launcher_does_what_the_line_says(launch: Any) -> None:
    """A terminal's Ctrl+C: SIGINT to the launcher's whole process group, 2 ranks."""
    run = launch(processes=2)
    run.wait_for_step(5)
    os.killpg(run.pid, signal.SIGINT)
    status = run.wait_exit()
    log = run.log()
    match = re.search(r"every rank now exits with status 130, which (.*): expected after SIGINT", log)
    assert match, run.log_tail()
    said = match.group(1)
    launcher_lines = log[match.end() :]
    if "passes on as its own status 130 without a traceback" in said:
        assert status == 130, run.log_tail()
        assert "Traceback" not in launcher_lines, run.log_tail()
    else:
        assert "reports with a traceback of its own and status 1" in said
        assert status == 1 and "Traceback" in launcher_lines, run.log_tail()
    print(f"\nthe line said: {said}; the launcher exited with {status}")
