"""A user's own accelerate training loop that adopted ckptbus (the lines marked ``ckptbus``).

    accelerate launch --multi_gpu --num_processes 2 user_loop.py OUTPUT_DIR [--no-cpu] [--every SECONDS]

Started by tests/test_python_api.py. Besides the three lines it subscribes
receivers of its own to the bus: one that raises on every event it gets, and
one that records ``save_completed`` on every rank and stops training 20
steps after the first checkpoint (so the run ends by itself, with ``close``).
``--no-cpu`` makes ``Accelerator()`` without ``cpu=True``: on a machine with
no GPU every rank then believes it is alone, and ckptbus must refuse.
``--every SECONDS`` adds a trigger source of the user's own (every_seconds.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from ckptbus.plugins import DynamicCheckpoint, release  # ckptbus

STEPS_AFTER_CHECKPOINT = 20


def main() -> None:
    out = Path(sys.argv[1])
    accelerator = Accelerator() if "--no-cpu" in sys.argv else Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    model, optimizer = accelerator.prepare(model, optimizer)

    sources = []
    if "--every" in sys.argv:
        from every_seconds import EverySeconds

        sources.append(EverySeconds(float(sys.argv[sys.argv.index("--every") + 1])))
    ckpt = DynamicCheckpoint(accelerator, out, sources=sources)  # ckptbus

    stop_at = [10**9]

    def broken(event: Any) -> None:
        raise RuntimeError(f"user receiver broke on {type(event).__name__}")

    def record(event: Any) -> None:
        with open(out / f"user-events-{accelerator.process_index}.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"event": type(event).__name__, "step": event.step, "path": event.path}) + "\n")
        stop_at[0] = min(stop_at[0], event.step + STEPS_AFTER_CHECKPOINT)

    ckpt.bus.subscribe("save_started", broken)
    ckpt.bus.subscribe("save_completed", broken)
    ckpt.bus.subscribe("save_completed", record)  # connected after the broken one: must still run

    step = 0
    generator = torch.Generator().manual_seed(accelerator.process_index)
    while step < stop_at[0]:
        x = torch.randn(4, 8, generator=generator)
        loss = model(x).pow(2).mean()
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        step += 1
        if accelerator.is_main_process:
            with open(out / "metrics.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"step": step, "loss": loss.item()}) + "\n")
        if ckpt.step(step):  # ckptbus
            break
    ckpt.close()  # ckptbus
    del model, optimizer  # before the process group goes: see ckptbus.plugins.release
    release(accelerator)


if __name__ == "__main__":
    main()
