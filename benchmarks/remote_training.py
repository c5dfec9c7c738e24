"""Training throughput while the main process uploads a checkpoint to S3, against no upload, in one run.

Run under the launcher, 2 ranks over gloo, from the repository root:

    accelerate launch --multi_gpu --num_processes 2 -m benchmarks.remote_training [--smoke]

Both ranks train the same GPT-2 (train.py's make_model, as benchmarks/overhead.py)
in short blocks of ``--block`` steps, the two arms interleaved (the arm that
goes first turns each round): ``none``, and ``uploading``, during which a
checkpoint of ``--mib`` MiB is uploaded without pause, the way the tier does
(``upload_checkpoint`` with its digest checks and boto3's part threads, in a
process of its own: plugins/tiers/upload_worker.py; ``--uploader thread``: in
a thread of the main process, as the tier did first), each time to a fresh
prefix.
The figure is the median over rounds of ``none block time / uploading block
time`` (target: >= 0.98), with every round's ratio in the JSON.

moto's S3 server runs in a process of its own on this machine: on 2 CPU cores
it takes CPU from training that a real object store would not, so the ratio
here is a floor for what the uploads cost, not the uploads alone.
``--smoke``: a tiny model and checkpoint, 2 rounds of 2 steps.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from ckptbus.plugins import release

from benchmarks.output import add_smoke_option, default_out, write_result
from benchmarks.remote_upload import make_checkpoint, moto_server
from ckptbus._object_store import ObjectStore
from ckptbus._remote_checkpoints import upload_checkpoint
from ckptbus._remote_url import RemoteDir
from testkit.s3_server import ACCESS_KEY, REGION, SECRET_KEY, environment
from train import ModelConfig, TrainConfig, make_data, make_model

ARMS = ("none", "uploading")
BUCKET = "bench-training"


def _upload_loop(info: Any, active: Any, sending: Any, idle: Any, stop: Any, done: Any) -> None:
    """Upload ``info`` again and again while ``active`` is set (in a thread, or in a process of its own)."""
    while not stop.is_set():
        if not active.wait(0.05):
            continue
        idle.clear()
        store = ObjectStore(RemoteDir(BUCKET, f"u{os.getpid()}-{done.value}"))
        upload_checkpoint(store, info, progress=lambda _n: sending.set())
        store.delete(list(store.objects(store.remote.prefix + "/")))
        store.close()
        with done.get_lock():
            done.value += 1
        if not active.is_set():
            idle.set()


class Uploads:
    """Uploads of one checkpoint, one after another, while :meth:`on` holds: in a thread of the main process, as
    the tier's, or (``process``) in a process of its own, which shares no GIL with training."""

    def __init__(self, info: Any, where: str) -> None:
        context = multiprocessing.get_context("spawn")
        self.active, self.sending, self.idle, self.stop = (context.Event() for _ in range(4))
        self.idle.set()
        self._done = context.Value("i", 0)
        args = (info, self.active, self.sending, self.idle, self.stop, self._done)
        target = _upload_loop
        self._worker: Any = (
            context.Process(target=target, args=args, daemon=True)
            if where == "process"
            else threading.Thread(target=target, args=args, name="ckptbus-uploader", daemon=True)
        )
        self._worker.start()

    @property
    def done(self) -> int:
        return int(self._done.value)

    def on(self) -> None:
        self.sending.clear()
        self.active.set()
        self.sending.wait(60)  # an upload is under way before the block starts

    def off(self) -> None:
        self.active.clear()
        self.idle.wait(300)  # nothing of it left in the next block

    def close(self) -> None:
        self.off()
        self.stop.set()
        self._worker.join(30)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--block", type=int, default=20, help="optimizer steps per block")
    parser.add_argument("--mib", type=int, default=64, help="size of the checkpoint's large file")
    parser.add_argument(
        "--uploader",
        choices=("thread", "process"),
        default="process",
        help="upload from a process of its own (as the tier does: plugins/tiers/upload_worker.py) or from a thread "
        "of the main process (as the tier did first)",
    )
    parser.add_argument("--out", help="the JSON result (default benchmarks/results/remote_training.json)")
    add_smoke_option(parser)
    args = parser.parse_args()
    n_embd, n_layer, n_head, seq, micro = 128, 3, 4, 64, 8
    if args.smoke:
        args.rounds, args.block, args.mib = 2, 2, 2
        n_embd, n_layer, n_head, seq, micro = 32, 1, 2, 16, 2
    args.out = args.out or default_out("remote_training", args.smoke)

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    cfg = TrainConfig(
        seed=0,
        micro_batch_size=micro,
        sequence_len=seq,
        dataset_size=64,
        model=ModelConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=256),
    )
    model = make_model(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model, optimizer = accelerator.prepare(model, optimizer)
    batch = make_data(cfg).tensors[0][: cfg.micro_batch_size].to(accelerator.device)

    def train_step() -> None:
        loss = model(input_ids=batch, labels=batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()

    for _ in range(2 if args.smoke else 20):
        train_step()

    main_rank = accelerator.is_main_process
    samples: dict[str, list[float]] = {arm: [] for arm in ARMS}
    with tempfile.TemporaryDirectory(prefix="ckptbus-bench-") as work:
        server = moto_server() if main_rank else None
        endpoint = server.__enter__() if server is not None else ""
        uploads: Uploads | None = None
        env = {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
        }
        try:
            with environment(env if main_rank else {}):
                if main_rank:
                    setup = ObjectStore(RemoteDir(BUCKET))
                    setup.client.create_bucket(Bucket=BUCKET)
                    setup.close()
                    uploads = Uploads(make_checkpoint(Path(work), args.mib), args.uploader)
                for round_index in range(args.rounds):
                    order = ARMS if round_index % 2 == 0 else ARMS[::-1]
                    for arm in order:
                        if uploads is not None and arm == "uploading":
                            uploads.on()
                        accelerator.wait_for_everyone()
                        start = time.perf_counter()
                        for _ in range(args.block):
                            train_step()
                        accelerator.wait_for_everyone()
                        samples[arm].append((time.perf_counter() - start) / args.block)
                        if uploads is not None:
                            uploads.off()
                if uploads is not None:
                    uploads.close()
        finally:
            if server is not None:
                server.__exit__(None, None, None)
    accelerator.wait_for_everyone()
    if main_rank:
        ratios = [n / u for n, u in zip(samples["none"], samples["uploading"], strict=True)]
        result = {
            "command": "accelerate launch --multi_gpu --num_processes 2 -m benchmarks.remote_training"
            + (" --smoke" if args.smoke else f" --rounds {args.rounds} --block {args.block} --mib {args.mib}")
            + f" --uploader {args.uploader}",
            "uploader": args.uploader,
            "what": "training throughput while the main process uploads to moto's S3 server (same machine) / none",
            "world_size": accelerator.num_processes,
            "rounds": args.rounds,
            "block_steps": args.block,
            "checkpoint_mib": args.mib,
            "uploads_done": uploads.done if uploads is not None else 0,
            "step_seconds_median": {arm: round(statistics.median(v), 5) for arm, v in samples.items()},
            "throughput_ratio_median": round(statistics.median(ratios), 4),
            "throughput_ratios": [round(r, 4) for r in ratios],
            "cpus": os.cpu_count(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
        }
        write_result(args.out, result, ["throughput_ratio_median", ("step_seconds_median", "none")])
        print(
            f"throughput while uploading / none: {result['throughput_ratio_median']:.3f} (median of {args.rounds} "
            f"rounds); steps {result['step_seconds_median']}; {result['uploads_done']} uploads; written to {args.out}"
        )
    # Our references to the DDP model go before the process group (see release()); the train_step closure holds
    # them, so they are dropped through its cells.
    model = optimizer = None
    release(accelerator)


if __name__ == "__main__":
    main()
