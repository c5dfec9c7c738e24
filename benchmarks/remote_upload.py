"""Upload throughput of a checkpoint to S3: ckptbus's tier against a plain boto3 upload of the same bytes.

    python -m benchmarks.remote_upload [--mib 128] [--rounds 5] [--out benchmarks/results/remote_upload.json] [--smoke]

moto's S3 server runs in a process of its own on 127.0.0.1 (not in this one,
whose GIL the clients use). One local checkpoint (a file of ``--mib`` MiB and
accelerate's small files) is uploaded each round by every arm, in an order
that turns each round (ABC, CBA, ...), to a fresh prefix, deleted after:

- ``ckptbus``: ``upload_checkpoint`` as the tier runs it: boto3's transfer
  manager reading each file once through the digest check, the manifest last
  with ``If-None-Match: *``;
- ``boto3``: ``upload_file`` of the same files (s3transfer, the same part size
  and concurrency), then the manifest with a plain PUT: the reference;
- ``obstore`` (a Rust client), when it is installed: ``obstore.put`` of each file.
  fsspec/s3fs is not measured: a current s3fs needs aiobotocore, whose botocore
  pin (< 1.43.118) excludes the botocore that boto3 1.44 needs; pip then falls
  back to s3fs 0.4.2 of 2020.

Figures: MB/s of each arm (median of the rounds) and each arm's ratio to
boto3's in the same round (median). ``--smoke``: 17 MiB (two parts), one round.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from benchmarks.output import add_smoke_option, default_out, write_result
from ckptbus._layout import CheckpointInfo, checkpoint_path, commit, prepare_staging, read_checkpoint
from ckptbus._names import MANIFEST_NAME
from ckptbus._object_store import ObjectStore, part_size
from ckptbus._remote_checkpoints import upload_checkpoint
from ckptbus._remote_url import RemoteDir
from testkit.procs import free_port, wait_for
from testkit.s3_server import ACCESS_KEY, REGION, SECRET_KEY, environment

PARALLELISM = 8


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """moto's S3 server in a process of its own; yields its endpoint URL."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def listening() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    try:
        wait_for(listening, "moto's server", 60)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(30)


def make_checkpoint(folder: Path, mib: int) -> CheckpointInfo:
    staging = prepare_staging(folder, 1)
    sizes = {"model.safetensors": mib << 20, "optimizer.bin": 2 << 20, "random_states_0.pkl": 15000}
    for name, size in sizes.items():
        with open(staging / name, "wb") as fh:
            for start in range(0, size, 8 << 20):
                fh.write(os.urandom(min(8 << 20, size - start)))
    commit(staging, checkpoint_path(folder, 1), {"step": 1, "kind": "full", "reason": "api", "world_size": 1})
    return read_checkpoint(checkpoint_path(folder, 1))


Arm = Callable[[ObjectStore, CheckpointInfo, str], Callable[[], None]]
"""Given the bucket's store, the checkpoint and a fresh prefix, an arm returns the upload to time (its client
made beforehand: the client's start is not what is measured)."""


def arm_ckptbus(store: ObjectStore, info: CheckpointInfo, prefix: str) -> Callable[[], None]:
    mine = ObjectStore(RemoteDir(store.remote.bucket, prefix), parallelism=PARALLELISM)

    def upload() -> None:
        upload_checkpoint(mine, info)
        mine.close()

    return upload


def arm_boto3(store: ObjectStore, info: CheckpointInfo, prefix: str) -> Callable[[], None]:
    # A client of its own, made beforehand, as the ckptbus arm has (both start with cold connections).
    mine = ObjectStore(store.remote, parallelism=PARALLELISM)

    def upload() -> None:
        boto3_upload(mine, info, prefix)
        mine.close()

    return upload


def boto3_upload(store: ObjectStore, info: CheckpointInfo, prefix: str) -> None:
    from boto3.s3.transfer import TransferConfig

    client = store.client
    for name, size in info.manifest.files.items():
        part = part_size(size)
        config = TransferConfig(multipart_threshold=part, multipart_chunksize=part, max_concurrency=PARALLELISM)
        client.upload_file(str(info.path / name), store.remote.bucket, f"{prefix}/checkpoint-1/{name}", Config=config)
    client.put_object(
        Bucket=store.remote.bucket,
        Key=f"{prefix}/checkpoint-1/{MANIFEST_NAME}",
        Body=(info.path / MANIFEST_NAME).read_bytes(),
    )


def obstore_arm(endpoint: str, bucket: str) -> Arm | str:
    """The obstore arm, or why there is none."""
    try:
        import obstore
        from obstore.store import S3Store
    except ImportError:
        return "obstore is not installed (pip install obstore)"
    s3 = S3Store(
        bucket,
        endpoint=endpoint,
        access_key_id=ACCESS_KEY,
        secret_access_key=SECRET_KEY,
        region=REGION,
        virtual_hosted_style_request=False,
        client_options={"allow_http": True},
    )

    def arm(store: ObjectStore, info: CheckpointInfo, prefix: str) -> Callable[[], None]:
        return lambda: upload(info, prefix)

    def upload(info: CheckpointInfo, prefix: str) -> None:
        for name, size in info.manifest.files.items():
            obstore.put(
                s3,
                f"{prefix}/checkpoint-1/{name}",
                info.path / name,
                chunk_size=part_size(size),
                max_concurrency=PARALLELISM,
            )
        obstore.put(s3, f"{prefix}/checkpoint-1/{MANIFEST_NAME}", (info.path / MANIFEST_NAME).read_bytes())

    return arm


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=128, help="size of the large file of the checkpoint")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", help="the JSON result (default benchmarks/results/remote_upload.json)")
    add_smoke_option(parser)
    args = parser.parse_args()
    if args.smoke:
        args.mib, args.rounds = 17, 1
    args.out = args.out or default_out("remote_upload", args.smoke)

    with tempfile.TemporaryDirectory(prefix="ckptbus-bench-") as work, moto_server() as endpoint:
        info = make_checkpoint(Path(work), args.mib)
        env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
        with environment({**env, "AWS_DEFAULT_REGION": REGION}):
            bucket = "bench"
            store = ObjectStore(RemoteDir(bucket), parallelism=PARALLELISM)
            store.client.create_bucket(Bucket=bucket)
            arms: dict[str, Arm] = {
                "ckptbus": arm_ckptbus,
                "boto3": arm_boto3,
            }
            skipped: dict[str, str] = {
                "s3fs": "a current s3fs needs aiobotocore, whose botocore pin (< 1.43.118) excludes botocore 1.44 "
                "(boto3 1.44); pip falls back to s3fs 0.4.2 of 2020"
            }
            extra = obstore_arm(endpoint, bucket)
            if isinstance(extra, str):
                skipped["obstore"] = extra
            else:
                arms["obstore"] = extra
            seconds: dict[str, list[float]] = {name: [] for name in arms}
            order = list(arms)
            for round_ in range(args.rounds):
                for name in order if round_ % 2 == 0 else order[::-1]:
                    prefix = f"{name}-{round_}"
                    upload = arms[name](store, info, prefix)
                    started = time.perf_counter()
                    upload()
                    seconds[name].append(time.perf_counter() - started)
                    store.delete(list(store.objects(prefix + "/")))
            store.close()
    total = info.manifest.bytes
    result: dict[str, Any] = {
        "what": "upload of one checkpoint to moto's S3 server (own process, 127.0.0.1), MB/s and ratio to boto3",
        "command": "python -m benchmarks.remote_upload"
        + (" --smoke" if args.smoke else f" --mib {args.mib} --rounds {args.rounds}"),
        "bytes": total,
        "rounds": args.rounds,
        "parallelism": PARALLELISM,
        "mb_per_second": {k: round(total / statistics.median(v) / 1e6, 2) for k, v in seconds.items()},
        "ratio_to_boto3": {
            k: round(statistics.median(b / s for s, b in zip(v, seconds["boto3"], strict=True)), 3)
            for k, v in seconds.items()
        },
        "seconds": {k: [round(x, 3) for x in v] for k, v in seconds.items()},
        "skipped": skipped,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    write_result(args.out, result, [("mb_per_second", k) for k in arms] + [("ratio_to_boto3", "ckptbus")])
    for name in arms:
        print(f"{name:8s} {result['mb_per_second'][name]:8.1f} MB/s   {result['ratio_to_boto3'][name]:.3f} of boto3")
    for name, why in skipped.items():
        print(f"{name:8s} not measured: {why}")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
