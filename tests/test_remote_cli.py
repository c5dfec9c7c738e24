"""``ckptbus list``, ``verify`` and ``status`` with object storage: in this process, against moto's S3 server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from remote_fixtures import SMALL, Bucket, bucket_fixture, make_checkpoint, s3_server_fixture  # noqa: F401 - fixtures

from ckptbus._remote_checkpoints import upload_checkpoint
from ckptbus.cli import main
from ckptbus.commands.status import format_status


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def uploaded(bucket: Bucket, tmp_path: Path, *steps: int) -> None:
    store = bucket.store()
    try:
        for step in steps:
            upload_checkpoint(store, make_checkpoint(tmp_path / "out", step, SMALL))
    finally:
        store.close()


def test_list_a_remote_dir(bucket: Bucket, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    uploaded(bucket, tmp_path, 2, 4)
    store = bucket.store()
    try:  # an upload that never completed: named on stderr, not in the table
        store.client.put_object(Bucket=bucket.name, Key=bucket.remote.checkpoint_key(6, "optimizer.bin"), Body=b"x")
    finally:
        store.close()
    code, out, err = cli(capsys, "list", bucket.url)
    assert code == 0, err
    assert f"{bucket.url}/checkpoint-2" in out and f"{bucket.url}/checkpoint-4" in out
    assert f"not usable (incomplete): {bucket.url}/checkpoint-6" in err
    code, out, _ = cli(capsys, "list", bucket.url, "--json")
    data = json.loads(out)
    assert [c["step"] for c in data["checkpoints"]] == [2, 4] and [u["step"] for u in data["unusable"]] == [6]


def test_verify_a_remote_dir_finds_a_flipped_byte(
    bucket: Bucket, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uploaded(bucket, tmp_path, 2, 4)
    code, out, err = cli(capsys, "verify", bucket.url)
    assert code == 0, err
    assert out.splitlines()[0].startswith("checkpoint-4  ok  4 files") and "checkpoint-2  ok" in out
    store = bucket.store()
    try:
        key = bucket.remote.checkpoint_key(2, "optimizer.bin")
        data = bytearray(store.get(key, limit=1 << 20) or b"")
        data[0] ^= 0x80
        store.client.put_object(Bucket=bucket.name, Key=key, Body=bytes(data))
    finally:
        store.close()
    code, out, err = cli(capsys, "verify", f"{bucket.url}/checkpoint-2", "--json")
    assert code == 1
    (row,) = json.loads(out)["checkpoints"]
    assert row["status"] == "failed" and row["file"] == "optimizer.bin" and "content digest" in row["problem"]
    code, out, _ = cli(capsys, "verify", bucket.url, "--mode", "sizes")
    assert code == 0, "sizes alone cannot see a flipped byte"


def test_bad_urls_are_usage_errors(bucket: Bucket, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, "list", "s3://Bad_Bucket/x")
    assert code == 2 and "bucket 'Bad_Bucket'" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli(capsys, "verify", f"{bucket.url}/checkpoint-99")
    assert code == 2 and "does not exist" in err


def test_status_shows_the_upload_backlog_and_the_last_throughput() -> None:
    text = format_status(
        {
            "output_dir": "/o",
            "step": 10,
            "uploads": {
                "remote_dir": "s3://b/p",
                "in_flight": 8,
                "in_flight_bytes_sent": 5_000_000,
                "queued": [10],
                "failed": {},
                "retrying": "cannot reach the object store",
                "last_uploaded": "s3://b/p/checkpoint-6",
                "last_upload_bytes_per_second": 42e6,
            },
        }
    )
    assert "to s3://b/p: in flight checkpoint-8 (5.0 MB sent), 1 queued (checkpoint-10), 0 failed" in text
    assert "upload retried:   cannot reach the object store" in text
    assert "last upload:      s3://b/p/checkpoint-6 (42.0 MB/s)" in text
    assert "uploads" not in format_status({"output_dir": "/o", "uploads": None})
