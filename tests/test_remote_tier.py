"""The uploads of a run (plugins/tiers/uploader.py) against moto's S3 server, in process: the endpoint killed
mid-upload and restarted, the backlog in status, local checkpoints kept until uploaded, the deadline at exit, and
the start-up probe's one-line refusals."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from ckptbus.plugins.tiers import RemoteTier
from remote_fixtures import SMALL, Bucket, bucket_fixture, make_checkpoint, s3_server_fixture  # noqa: F401 - fixtures

from ckptbus import SetupError
from ckptbus._config import RemoteConfig
from ckptbus._layout import rotate
from ckptbus._object_store import PART_BYTES
from ckptbus._remote_checkpoints import scan_remote, verify_remote
from testkit.procs import wait_for
from testkit.s3_server import S3Server, authentication, environment, free_port


@pytest.fixture
def own_server() -> Iterator[S3Server]:
    """A server of the test's own, to stop and start again (the module's server serves the other tests)."""
    server = S3Server().start()
    try:
        with environment(server.env()):
            yield server
    finally:
        server.stop()


def complete_steps(bucket: Bucket) -> list[int]:
    store = bucket.store()
    try:
        return [c.step for c in scan_remote(store)[0]]
    finally:
        store.close()


def test_uploads_go_on_after_the_endpoint_is_killed_mid_upload_and_comes_back(
    own_server: S3Server, tmp_path: Path
) -> None:
    bucket = Bucket(own_server, own_server.new_bucket())
    out = tmp_path / "out"
    tier = RemoteTier(bucket.url, RemoteConfig(keep=1, parallelism=2))
    tier.start()
    try:
        first = make_checkpoint(out, 2, SMALL)
        tier.submit(first)
        wait_for(lambda: complete_steps(bucket) == [2], "checkpoint-2 complete in the bucket", 60)
        big = make_checkpoint(out, 4, {**SMALL, "optimizer.bin": 6 * PART_BYTES})  # seconds at moto's pace
        tier.submit(big)
        wait_for(lambda: (tier.status()["in_flight_bytes_sent"] or 0) > 0, "the upload of checkpoint-4 under way", 60)
        own_server.stop()  # mid-upload
        status = wait_for(lambda: tier.status()["retrying"] and tier.status(), "the upload retried", 60)
        assert status["in_flight"] == 4 and "cannot reach the object store" in status["retrying"]
        # Local rotation (save_total_limit 1) keeps what is not uploaded, whatever the limit says.
        third = make_checkpoint(out, 6, SMALL)
        tier.submit(third)
        assert tier.unfinished() == {big.path, third.path}
        assert rotate(out, 1, keep=(third.path, *tier.unfinished())) == [first.path]
        assert big.path.exists() and third.path.exists()
        own_server.start()  # the same port: the endpoint is back, with its buckets
        line = tier.drain(120)
    finally:
        tier.drain(0)
    assert line == f"ckptbus: checkpoints safe in {bucket.url}: the newest is {bucket.url}/checkpoint-6", line
    assert complete_steps(bucket) == [6], "remote.keep=1: only the newest, deleted after it was complete"
    assert tier.unfinished() == set()
    store = bucket.store()
    try:
        assert all(verify_remote(store, c).ok for c in scan_remote(store)[0])
    finally:
        store.close()
    status = tier.status()
    assert status["last_uploaded"] == f"{bucket.url}/checkpoint-6" and status["last_upload_bytes_per_second"]


def test_the_deadline_at_exit_names_what_is_not_in_the_bucket(own_server: S3Server, tmp_path: Path) -> None:
    bucket = Bucket(own_server, own_server.new_bucket())
    tier = RemoteTier(bucket.url, RemoteConfig(exit_deadline_seconds=1.0))
    tier.start()
    own_server.stop()
    try:
        tier.submit(make_checkpoint(tmp_path, 8, SMALL))
        line = tier.drain()
    finally:
        own_server.start()
    assert line.startswith(f"ckptbus: NOT in {bucket.url}: checkpoint-8 not uploaded by the 1 s deadline")
    assert "complete on local disk only" in line and "none is complete there" in line
    assert complete_steps(bucket) == []


def test_start_refuses_in_one_line_a_missing_bucket_wrong_credentials_and_no_endpoint(bucket: Bucket) -> None:
    def refusal(url: str) -> str:
        tier = RemoteTier(url, RemoteConfig())
        with pytest.raises(SetupError) as info:
            tier.start()
        assert tier.status()["in_flight"] is None
        text = str(info.value)
        assert "\n" not in text
        return text

    assert "bucket 'nowhere-bucket' of s3://nowhere-bucket/x does not exist" in refusal("s3://nowhere-bucket/x")
    with authentication(), environment({"AWS_ACCESS_KEY_ID": "AKIAWRONGWRONGWRONG1", "AWS_SECRET_ACCESS_KEY": "x"}):
        assert "refused the credentials (InvalidAccessKeyId" in refusal(bucket.url)
    with environment({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}):
        assert "cannot reach the object store" in refusal(bucket.url)
