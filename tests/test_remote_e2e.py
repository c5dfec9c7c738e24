"""The object-storage tier end to end: ``accelerate launch`` with 2 ranks, moto's S3 server on 127.0.0.1.

One run uploads its checkpoints, loses the endpoint mid-run (the server is
stopped: connections cut, port closed) and trains on while its uploads are
retried and its local checkpoints are kept; the whole job is SIGKILLed with
uploads pending; the server comes back; the local output_dir is deleted; a
second run resumes ``latest`` from the bucket alone (passing over a newer
checkpoint whose upload never completed) and repeats the first run's losses
bit for bit.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from runs import TrainingRun, read_jsonl

from ckptbus import list_checkpoints
from ckptbus._object_store import ObjectStore
from ckptbus._remote_checkpoints import scan_remote
from ckptbus._remote_url import parse_remote
from testkit.s3_server import S3Server, environment

pytestmark = pytest.mark.slow

DATA = {"dataset_size": 64, "micro_batch_size": 4, "sequence_len": 16}
Launch = Callable[..., TrainingRun]


@pytest.fixture
def server() -> Iterator[S3Server]:
    s3 = S3Server().start()
    try:
        with environment(s3.env()):
            yield s3
    finally:
        s3.stop()


def remote_steps(url: str) -> tuple[list[int], list[int]]:
    """(complete, incomplete) checkpoint steps in the bucket."""
    store = ObjectStore(parse_remote(url), attempts=1)
    try:
        complete, unusable = scan_remote(store)
    finally:
        store.close()
    return [c.step for c in complete], [u.step for u in unusable]


def losses(rows: list[dict[str, Any]]) -> dict[int, float]:
    return {int(r["step"]): float(r["loss"]) for r in rows}


@pytest.mark.timeout(600)
def test_outage_sigkill_and_resume_from_the_bucket_alone_repeat_the_losses(
    launch: Launch, tmp_path: Path, server: S3Server
) -> None:
    url = f"s3://{server.new_bucket()}/runs/e2e"
    config = {
        **DATA,
        "max_steps": 100000,
        "save_steps": 4,
        "save_total_limit": 1,
        "remote_dir": url,
        "remote": {"keep": 2},
        "dynamic_checkpoint": {"enabled": False},
    }
    first = launch(processes=2, config=config, env=server.env(), name="first")
    first.wait_for(lambda: len(remote_steps(url)[0]) >= 2, "two checkpoints complete in the bucket", 240)
    server.stop()  # the endpoint goes away mid-run
    first.wait_for(lambda: "is retried (training goes on" in first.log(), "an upload retried", 120)
    # Training goes on, and nothing local that is not uploaded is deleted (save_total_limit is 1).
    first.wait_for(lambda: len(list_checkpoints(first.output_dir)) >= 3, "three local checkpoints kept", 240)
    first.kill()  # SIGKILL of the whole job, uploads pending
    killed_rows = first.metrics()
    killed_at = int(killed_rows[-1]["step"])
    local_newest = list_checkpoints(first.output_dir)[-1].step
    server.start()
    complete, _ = remote_steps(url)
    newest = complete[-1]
    # remote.keep is 2; a third may be there if the endpoint went away between an upload and the rotation after it.
    assert 2 <= len(complete) <= 3, complete
    assert newest < local_newest <= killed_at, (complete, local_newest, killed_at)

    # An upload killed before its manifest, newer than everything: its objects are there, it is not complete.
    store = ObjectStore(parse_remote(url))
    try:
        for key, _size in store.objects(store.remote.checkpoint_key(newest)).items():
            name = key.rsplit("/checkpoint-", 1)[1].split("/", 1)[1]
            if name != "ckptbus.json":
                store.client.copy_object(
                    Bucket=store.remote.bucket,
                    Key=store.remote.checkpoint_key(1000, name),
                    CopySource={"Bucket": store.remote.bucket, "Key": key},
                )
    finally:
        store.close()
    after = remote_steps(url)
    # (An upload cut by the outage may have left objects of its own without a manifest too: never complete.)
    assert after[0] == complete and 1000 in after[1], after

    shutil.rmtree(first.output_dir)  # the machine is gone
    second = launch(
        processes=2,
        config={**config, "output_dir": str(tmp_path / "second")},
        extra_args=["--resume-from-checkpoint", "latest"],
        env=server.env(),
        name="second",
    )
    second.wait_for(lambda: len(read_jsonl(second.output_dir / "metrics.jsonl")) >= 6, "6 steps after resuming", 240)
    second.kill()
    log = second.log()
    assert f"resumed from {second.output_dir / f'checkpoint-{newest}'} at step {newest}" in log, second.log_tail()
    assert f"downloaded {url}/checkpoint-{newest}" in log
    assert f"skipped {url}/checkpoint-1000" in log
    resumed = losses(second.metrics())
    assert min(resumed) == newest + 1
    reference = losses(killed_rows)
    overlap = {s: resumed[s] for s in resumed if s <= killed_at}
    assert len(overlap) >= 6
    different = {s: (reference[s], overlap[s]) for s in overlap if overlap[s] != reference[s]}
    assert not different, f"losses differ after resuming from the bucket (step: (first run, resumed)): {different}"
