"""One rank of a real 2-process gloo run of the Coordinator (started by tests/test_coordinator.py).

Usage: RANK=r WORLD_SIZE=2 LOCAL_RANK=r MASTER_ADDR=127.0.0.1 MASTER_PORT=p python coordinator_rank.py RESULT.json

Each rank makes its own requests, calls ``decide`` at the same steps, and
writes what it decided to RESULT.json. The exchange is the real one
(``TorchExchange`` over gloo). At the end rank 1 exits without voting, so
rank 0's exchange fails for real: its request must stay pending.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from accelerate import Accelerator
from ckptbus.plugins.distributed import TorchExchange

from ckptbus import SaveRequested
from ckptbus._coordinator import Coordinator, Decision


def describe(decision: Decision | None) -> dict[str, Any] | None:
    if decision is None:
        return None
    return {
        "step": decision.step,
        "kind": decision.kind,
        "exit_after": decision.exit_after,
        "reason": decision.reason,
        "signum": decision.signum,
        "requests": [r.request_id for r in decision.requests],
    }


def main() -> None:
    result_path = sys.argv[1]
    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    result: dict[str, Any] = {"rank": rank, "world_size": accelerator.num_processes}
    coordinator = Coordinator(TorchExchange(accelerator), check_interval=5, save_steps=20)

    # Step 3 is not due: nothing is exchanged, the request waits.
    if rank == 1:
        coordinator.enqueue(SaveRequested(reason="signal:SIGTERM", exit_after=True, request_id="r1-term"))
    else:
        coordinator.enqueue(SaveRequested(kind="weights", reason="socket", request_id="r0-weights"))
    result["step3"] = describe(coordinator.decide(3))
    result["pending_after_step3"] = coordinator.pending_count()
    # Step 5 is due: the votes of both ranks merge.
    result["step5"] = describe(coordinator.decide(5))
    result["pending_after_step5"] = coordinator.pending_count()
    # Step 10: due, nobody asked.
    result["step10"] = describe(coordinator.decide(10))
    # A request on rank 0 only (the file trigger is polled on the main process only).
    if rank == 0:
        coordinator.enqueue(SaveRequested(reason="file", request_id="r0-file"))
    result["step15"] = describe(coordinator.decide(15))
    # Step 20 is scheduled: both ranks vote for it with nothing pending.
    result["step20"] = describe(coordinator.decide(20))

    # Pipelined votes (what a run with signals does): started at one step, read at the next.
    exchange = TorchExchange(accelerator)
    piped = Coordinator(exchange, check_interval=5, save_steps=20, every_step=True, start_exchange=exchange.start)
    if rank == 1:
        piped.enqueue(SaveRequested(kind="weights", reason="signal:SIGINT", exit_after=True, request_id="r1-int"))
    result["piped21"] = describe(piped.decide(21))  # started, not read
    result["piped21_in_flight"] = piped.vote_in_flight
    result["piped22"] = describe(piped.decide(22))  # rank 1's request, decided on both ranks one step later
    result["piped22_in_flight"] = piped.vote_in_flight
    result["piped23"] = describe(piped.decide(23))
    if rank == 0:
        piped.enqueue(SaveRequested(reason="socket", request_id="r0-socket"))
    result["piped24"] = describe(piped.decide(24))  # the vote of step 23 read, this one started
    result["piped25"] = describe(piped.decide(25))  # a check_interval multiple: read step 24's and vote now
    result["piped_close"] = describe(piped.decide(25, force=True))
    result["piped_close_in_flight"] = piped.vote_in_flight

    if rank == 1:
        with open(result_path, "w", encoding="utf-8") as fh:
            json.dump(result, fh)
        os._exit(0)  # leaves without voting at step 25 and without a clean shutdown
    coordinator.enqueue(SaveRequested(reason="api", request_id="r0-api"))
    try:
        result["step25"] = describe(coordinator.decide(25))
    except Exception as exc:  # the real gloo error of a peer that is gone
        result["step25_error"] = f"{type(exc).__name__}: {exc}"
    result["pending_after_failure"] = [r.request_id for r in coordinator.pending()]
    with open(result_path, "w", encoding="utf-8") as fh:
        json.dump(result, fh)
    os._exit(0)


if __name__ == "__main__":
    main()
