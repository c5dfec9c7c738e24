"""Shared by the object-storage tests: a moto S3 server for the module, a bucket per test, local checkpoints.

The server is real S3 HTTP on 127.0.0.1 (testkit/s3_server.py); nothing is
mocked. It lives for the module (started before the leak guard's snapshot),
and every test gets its own bucket and the ``AWS_*`` variables pointing at it. A test module imports
``bucket_fixture`` and ``s3_server_fixture`` and asks for ``bucket`` or ``s3_server``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ckptbus._layout import CheckpointInfo, checkpoint_path, commit, prepare_staging, read_checkpoint
from ckptbus._object_store import ObjectStore
from ckptbus._remote_url import RemoteDir, parse_remote
from testkit.s3_server import S3Server, environment


@dataclass
class Bucket:
    server: S3Server
    name: str

    @property
    def remote(self) -> RemoteDir:
        return parse_remote(self.url)

    @property
    def url(self) -> str:
        return f"s3://{self.name}/runs/one"

    def store(self, **kwargs: int) -> ObjectStore:
        return ObjectStore(self.remote, **kwargs)


@pytest.fixture(scope="module", name="s3_server")
def s3_server_fixture() -> Iterator[S3Server]:
    server = S3Server().start()
    yield server
    server.stop()


@pytest.fixture(name="bucket")
def bucket_fixture(s3_server: S3Server) -> Iterator[Bucket]:
    with environment(s3_server.env()):
        yield Bucket(s3_server, s3_server.new_bucket())


def make_checkpoint(output_dir: Path, step: int, sizes: dict[str, int], *, kind: str = "full") -> CheckpointInfo:
    """A complete local checkpoint of random files of ``sizes``, committed by the layout's own commit."""
    staging = prepare_staging(output_dir, step)
    for name, size in sizes.items():
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        (staging / name).write_bytes(os.urandom(size))
    commit(
        staging, checkpoint_path(output_dir, step), {"step": step, "kind": kind, "reason": "schedule", "world_size": 2}
    )
    return read_checkpoint(checkpoint_path(output_dir, step))


SMALL = {"model.safetensors": 3000, "optimizer.bin": 5000, "random_states_0.pkl": 100, "random_states_1.pkl": 100}
"""A checkpoint's shape, small: four files (names as accelerate writes them)."""
