"""Refuse, at start-up, an ``output_dir`` whose sharing between machines does not match ``save_on_each_node``.

With several machines a checkpoint has one committer per filesystem
(docs/multinode.md): the main process when ``output_dir`` is shared, the
local main process of each machine with ``save_on_each_node``. Get that
wrong and the run only finds out at its first save, hours in:

- ``save_on_each_node`` with a shared ``output_dir``: two committers rename
  the same staging directory;
- a per-machine ``output_dir`` without it: the ranks of other machines find
  no staging directory to write their RNG state into, and every save fails.

So the main process writes a probe file into ``output_dir`` and the local
main process of every other machine looks for it. Single-machine runs pay
one small collective and write nothing.
"""

from __future__ import annotations

import contextlib
import secrets
from pathlib import Path

import torch.distributed as dist

from ckptbus import SetupError
from ckptbus._coordinator import Exchange

PROBE_PREFIX = ".ckptbus-probe-"


def check_output_dir_layout(
    output_dir: Path,
    exchange: Exchange,
    *,
    world_size: int,
    is_main: bool,
    is_local_main: bool,
    save_on_each_node: bool,
) -> None:
    """Collective (every rank calls it). Raises :class:`~ckptbus.SetupError` on every rank on a mismatch."""
    if world_size == 1:
        return
    other_machine = is_local_main and not is_main
    if not exchange([int(other_machine)])[0]:
        return  # one machine: nothing to compare
    name = [PROBE_PREFIX + secrets.token_hex(8) if is_main else ""]
    dist.broadcast_object_list(name, src=0)
    probe = output_dir / name[0]
    created = 1
    if is_main:
        try:
            probe.touch()
        except OSError:
            created = 0
    seen = not_seen = 0
    if exchange([1 - created])[0] == 0 and other_machine:  # (also the barrier: the probe exists from here on)
        seen, not_seen = (1, 0) if probe.exists() else (0, 1)
    any_seen, any_not_seen = exchange([seen, not_seen])
    if is_main:
        with contextlib.suppress(OSError):
            probe.unlink()
    if save_on_each_node and any_seen:
        raise SetupError(
            f"save_on_each_node is true but output_dir {str(output_dir)!r} is shared between machines (another "
            "machine sees the files the main process writes there): two committers would rename the same staging "
            "directory. Set save_on_each_node: false, or give every machine an output_dir on its own disk."
        )
    if not save_on_each_node and any_not_seen:
        raise SetupError(
            f"output_dir {str(output_dir)!r} is not shared between machines (another machine does not see the "
            "files the main process writes there), and save_on_each_node is false: the other machines' ranks would "
            "find no staging directory and every save would fail. Use a directory on a shared filesystem, or set "
            "save_on_each_node: true to keep one copy of each checkpoint per machine."
        )
