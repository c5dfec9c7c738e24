"""The end of an accelerate run: release the prepared objects, then the process group, in that order.

    ckpt.close()
    del model, optimizer, loader, scheduler   # your own references first
    release(accelerator)

The order is the point. Under DDP the prepared model holds a Reducer, and the
Reducer holds the process group. If the group goes first and the model is
freed later (at interpreter exit, say), the Reducer drops the group's last
reference: gloo's destructor then joins its threads while holding the GIL,
and a gloo thread still freeing the last all_reduce's tensor waits for the
GIL, a hang at exit (seen 1 run in 7 on 2 busy cores). Destroyed by
``destroy_process_group`` while nothing else holds it, the group releases
the GIL first.
"""

from __future__ import annotations

import gc
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from accelerate import Accelerator


def release(accelerator: Accelerator) -> None:
    """Free what ``accelerator`` prepared, then destroy the process group: the last call of a run, on every rank.

    Call it after ``DynamicCheckpoint.close()`` (or the Trainer's end) and
    after dropping your own references to the prepared model, optimizer,
    data loader and scheduler (``del model, optimizer, loader``): this drops
    accelerate's references (``accelerator.free_memory()``) and collects the
    cycles left, but the ones you hold it cannot drop, and a DDP model still
    alive when the group is destroyed is what hangs at exit (module
    docstring). ``accelerator.end_training()`` then finishes its trackers
    and destroys the process group where one is initialised (every
    accelerate that ckptbus supports does, since 0.34; it leaves alone a
    group that a fork launcher such as ``notebook_launcher`` owns). No
    collective can run afterwards.

    An exception from accelerate propagates, and the steps after it are
    skipped.
    """
    accelerator.free_memory()
    # free_memory() collects before it clears its lists; the model is freed here, while the group is alive.
    gc.collect()
    accelerator.end_training()
