"""Every runnable example in README.md and docs/*.md is run for real, so the docs cannot drift.

The convention (also at the top of docs/guide.md): an HTML comment on the
line right before a fenced block marks it runnable::

    <!-- test: KIND [option=value ...] -->

KIND is one of

- ``python``: the block is a script, run with the project's Python;
- ``accelerate``: the block is a script, run with ``accelerate launch
  --multi_gpu --num_processes 2`` (gloo, 2 ranks);
- ``sh``: the block is run by ``bash -e`` while ``make train``'s job runs
  (``train.py --config configs/tiny.yaml``, output in ``outputs/tiny``,
  without a step limit; it is killed when the page is done);
- ``file``: the block is written to the file ``name=...`` for the blocks
  after it (a config, say);
- ``config``: the block is a ``train.py`` config file, or a fragment of one
  (without ``output_dir``, which is then added); it must load.

Options: ``run=stop`` (an ``sh`` block that runs after the training job was
stopped, e.g. a resume), ``expect=PATH`` (a glob that must match a file once the block ran;
may repeat), ``stdout=TEXT`` (``_`` for a space; must appear in its output).

The blocks of one page run in order, in one scratch directory laid out like
this repository (``.venv``, ``configs``, ``train.py`` are links to it), so
``.venv/bin/ckptbus`` and ``configs/tiny.yaml`` mean what they say.
``accelerate launch`` in a block gets ``--main_process_port`` of a free port,
so tests running side by side never collide on 29500.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from runs import BIN, REPO, TrainingRun, accelerate_launch

from testkit.procs import free_port

MARKER = re.compile(r"^<!-- test: (?P<kind>[a-z]+)(?P<options>[^>]*)-->\s*$")
FENCE = re.compile(r"^(?P<fence>```+|~~~+)")
KINDS = ("python", "accelerate", "sh", "file", "config")
PAGES = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md")])
TIMEOUT = 300.0


@dataclass
class Block:
    page: Path
    line: int
    kind: str
    code: str
    options: dict[str, list[str]] = field(default_factory=dict)

    def option(self, name: str) -> list[str]:
        return self.options.get(name, [])

    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def blocks_of(page: Path) -> list[Block]:
    """The marked blocks of ``page``, in order; a marker not followed by a fenced block is an error."""
    lines = page.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        marker = MARKER.match(lines[i])
        i += 1
        if marker is None:
            continue
        kind = marker["kind"]
        assert kind in KINDS, f"{page}:{i}: unknown test kind {kind!r}; use one of {KINDS}"
        fence = FENCE.match(lines[i]) if i < len(lines) else None
        assert fence is not None, f"{page}:{i}: a <!-- test: --> marker must be right before a fenced block"
        options: dict[str, list[str]] = {}
        for item in shlex.split(marker["options"]):
            key, _, value = item.partition("=")
            options.setdefault(key, []).append(value.replace("_", " ") if key == "stdout" else value)
        start = i + 1
        end = start
        while not lines[end].startswith(fence["fence"]):
            end += 1
        found.append(Block(page, i + 1, kind, "\n".join(lines[start:end]) + "\n", options))
        i = end + 1
    return found


RUNNABLE = [page for page in PAGES if blocks_of(page)]


def test_the_convention_is_used() -> None:
    """The pages that promise runnable examples have them (a marker typo would silently skip a page)."""
    names = {page.name for page in RUNNABLE}
    assert {"README.md", "guide.md", "trainer.md"} <= names, names


class Page:
    """The scratch directory of one page, and the training run its ``sh`` blocks talk to."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        for name in (".venv", "configs", "train.py"):
            (workdir / name).symlink_to(REPO / name)
        self.run: TrainingRun | None = None
        self.env = dict(os.environ)
        self.env.update(
            {
                "PATH": f"{BIN}{os.pathsep}{self.env.get('PATH', '')}",
                "PYTHONUNBUFFERED": "1",
                "OMP_NUM_THREADS": "1",
                "HF_HUB_OFFLINE": "1",
                "ACCELERATE_DISABLE_RICH": "1",
                "TOKENIZERS_PARALLELISM": "false",
            }
        )
        self.env.pop("ACCELERATE_USE_CPU", None)

    def training(self) -> TrainingRun:
        """``make train``'s job in this directory (started on first use), past its first vote."""
        if self.run is None:
            # The run uses configs/tiny.yaml itself (output_dir: outputs/tiny), as `make train` does.
            run = TrainingRun(
                self.workdir, name="make-train", config={"output_dir": str(self.workdir / "outputs/tiny")}
            )
            run.config_path.unlink()
            self.run = run.start(
                accelerate_launch("train.py", "--config", "configs/tiny.yaml", "--max-steps", "100000")
            )
            self.run.wait_for_step(12, timeout=TIMEOUT)
        return self.run

    def close(self) -> None:
        if self.run is not None:
            self.run.kill()
            self.run = None

    def execute(self, block: Block) -> str:
        """Run ``block``; return its output. Fails with the output when it exits non-zero."""
        if block.kind == "file":
            (name,) = block.option("name")
            (self.workdir / name).write_text(block.code, encoding="utf-8")
            return ""
        if block.kind == "config":
            path = self.workdir / f"config-{block.line}.yaml"
            # A fragment (a block of keys without output_dir) is checked inside a minimal config.
            code = (
                block.code if re.search(r"^output_dir:", block.code, re.MULTILINE) else "output_dir: out\n" + block.code
            )
            path.write_text(code, encoding="utf-8")
            cmd = [sys.executable, "-c", "import sys, train; train.load(train.parse_args(['--config', sys.argv[1]]))"]
            cmd.append(str(path))
            self.env["PYTHONPATH"] = str(REPO)
        elif block.kind == "python":
            path = self.workdir / f"example_{block.line}.py"
            path.write_text(block.code, encoding="utf-8")
            cmd = [sys.executable, str(path)]
        elif block.kind == "accelerate":
            path = self.workdir / f"example_{block.line}.py"
            path.write_text(block.code, encoding="utf-8")
            cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2"]
            cmd += ["--main_process_port", str(free_port()), str(path)]
        else:
            if "stop" in block.option("run"):
                self.close()
            else:
                self.training()
            code = re.sub(r"\baccelerate launch ", f"accelerate launch --main_process_port {free_port()} ", block.code)
            cmd = ["bash", "-euo", "pipefail", "-c", code]
        proc = subprocess.run(
            cmd,
            cwd=self.workdir,
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            start_new_session=True,
        )
        output = proc.stdout + proc.stderr
        run_log = self.run.log_tail() if self.run is not None else ""
        assert proc.returncode == 0, f"{block.where()}: exit {proc.returncode}\n{block.code}\n{output}\n{run_log}"
        for text in block.option("stdout"):
            assert text in output, f"{block.where()}: {text!r} not in the output\n{output}"
        for pattern in block.option("expect"):
            assert list(self.workdir.glob(pattern)), f"{block.where()}: nothing matches {pattern}\n{output}"
        return output


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("page", RUNNABLE, ids=[str(p.relative_to(REPO)) for p in RUNNABLE])
def test_runnable_examples(page: Path, tmp_path: Path) -> None:
    scratch = Page(tmp_path)
    try:
        for block in blocks_of(page):
            scratch.execute(block)
    finally:
        scratch.close()
