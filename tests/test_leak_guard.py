"""The guard of tests/conftest.py: a test that leaves a thread, a process or a socket behind fails.

The guarded tests run in a pytest of their own (a subprocess), with
tests/conftest.py loaded as a plugin, as it is for every test here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from runs import REPO

from testkit.procs import process_env

GUARDED = """
import socket
import subprocess
import threading
import time
from pathlib import Path


def test_clean():
    worker = threading.Thread(target=time.sleep, args=(0.01,), name="short")
    worker.start()
    worker.join()


def test_a_thread_that_ends_soon_after_the_test():
    threading.Thread(target=time.sleep, args=(1.0,), name="ends-soon").start()


def test_leaks_all_three():
    threading.Thread(target=time.sleep, args=(60.0,), name="sleeper", daemon=True).start()
    # "sleep" outlives its shell: init adopts it, and only its environment says whose it is.
    shell = subprocess.run(["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"], capture_output=True, text=True)
    Path("orphan.pid").write_text(shell.stdout.strip())
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    test_leaks_all_three.kept = server
"""


def test_the_guard_names_what_a_test_left_behind(tmp_path: Path) -> None:
    (tmp_path / "test_guarded.py").write_text(GUARDED, encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "tests"), str(REPO)]))
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-q", "-rE", "test_guarded.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    report = out.stdout + out.stderr
    assert re.search(r"\b3 passed, 1 error\b", report), report
    assert "ERROR at teardown of test_leaks_all_three" in report, report
    orphan = int((tmp_path / "orphan.pid").read_text())
    assert re.search(r"thread 'sleeper' \(daemon\), running time\.sleep, at .*threading\.py:\d+ in run", report), report
    assert re.search(rf"process {orphan} \(parent \d+\): sleep 60", report), report
    assert re.search(r"socket fd \d+: tcp 127\.0\.0\.1:\d+", report), report
    assert "ends-soon" not in report, report
    # The guard killed the leaked process (it is gone, or a zombie its new parent has yet to reap).
    assert not process_env(orphan) or Path(f"/proc/{orphan}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
