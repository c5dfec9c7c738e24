"""ckptbus's log lines with no logging set-up: seen once per run, never twice, never inside a progress bar.

Each case runs in a fresh interpreter, because logging's configuration is
process-wide (and pytest's own capture would take the records).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from runs import REPO


def run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", **env},
    )


def test_info_lines_appear_without_any_logging_set_up_from_the_first_process_of_a_machine_only() -> None:
    code = """
        import logging
        from ckptbus._logging import set_up
        set_up()  # the rank on this machine from the launcher's LOCAL_RANK variable
        log = logging.getLogger("ckptbus")
        log.info("ckptbus: saved full checkpoint X")
        log.warning("ckptbus: rank trouble")
    """
    main = run(code)
    assert main.stderr.splitlines() == ["ckptbus: saved full checkpoint X", "ckptbus: rank trouble"], main.stderr
    other = run(code, LOCAL_RANK="1")
    assert other.stderr.splitlines() == ["ckptbus: rank trouble"], other.stderr


def test_a_program_that_configures_logging_gets_each_line_once() -> None:
    code = """
        import logging
        logging.basicConfig(level=logging.INFO, format="ROOT %(message)s")
        from ckptbus._logging import set_up
        set_up(0)
        logging.getLogger("ckptbus").info("ckptbus: hello")
    """
    done = run(code)
    assert done.stderr.splitlines() == ["ROOT ckptbus: hello"], done.stderr


def test_the_level_variable_and_a_level_the_program_set_win() -> None:
    code = """
        import logging
        from ckptbus._logging import set_up
        set_up(1)
        logging.getLogger("ckptbus").debug("ckptbus: debug line")
    """
    assert run(code, CKPTBUS_LOG_LEVEL="debug").stderr.splitlines() == ["ckptbus: debug line"]
    assert run(code).stderr == ""
    own = """
        import logging
        logging.getLogger("ckptbus").setLevel(logging.ERROR)
        from ckptbus._logging import set_up
        set_up(0)
        logging.getLogger("ckptbus").warning("ckptbus: hidden by the program's own level")
    """
    assert run(own).stderr == ""
    bad = run(code, CKPTBUS_LOG_LEVEL="loud")
    assert "CKPTBUS_LOG_LEVEL='LOUD' is not one of" in bad.stderr


def test_a_line_logged_while_a_progress_bar_is_drawn_stands_on_a_line_of_its_own() -> None:
    code = """
        import logging, sys
        from tqdm import tqdm
        from ckptbus._logging import set_up
        set_up(0)
        bar = tqdm(total=10, file=sys.stderr, mininterval=0, ascii=True, desc="train")
        bar.update(3)
        logging.getLogger("ckptbus").info("ckptbus: saved full checkpoint Y")
        bar.update(3)
        bar.close()
    """
    done = run(code)
    lines = done.stderr.replace("\r", "\n").splitlines()
    assert "ckptbus: saved full checkpoint Y" in lines, done.stderr
