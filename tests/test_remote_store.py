"""The object-storage tier against a real S3 API (moto's server on 127.0.0.1), in process: no mocks.

Upload (parts, digests checked as read, manifest last and only if absent),
what counts as complete in the bucket, download (digests checked as they
arrive, staging + rename), damage in the bucket (a flipped byte, a missing
object), a local file changed before its upload, rotation in the bucket, and
the start-up probe's refusals (missing bucket, wrong credentials,
unreachable endpoint).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from remote_fixtures import SMALL, Bucket, bucket_fixture, make_checkpoint, s3_server_fixture  # noqa: F401 - fixtures

from ckptbus import CheckpointError, ConfigError, list_checkpoints
from ckptbus._names import MANIFEST_NAME, STAGING_PREFIX
from ckptbus._object_store import PART_BYTES, DigestMismatch, ObjectStore, ObjectStoreError
from ckptbus._remote_checkpoints import (
    download_checkpoint,
    find_remote,
    remote_victims,
    rotate_remote,
    scan_remote,
    upload_checkpoint,
    verify_remote,
)
from ckptbus._remote_url import parse_remote, parse_target
from ckptbus._resume import resolve
from testkit.s3_server import authentication, environment, free_port


def keys(bucket: Bucket) -> dict[str, int]:
    store = bucket.store()
    try:
        return store.objects("")
    finally:
        store.close()


# -- URLs ----------------------------------------------------------------------------------------------------


def test_urls_are_parsed_and_bad_ones_named() -> None:
    remote = parse_remote("s3://my-bucket/a/b/")
    assert (remote.bucket, remote.prefix) == ("my-bucket", "a/b")
    assert remote.manifest_key(7) == "a/b/checkpoint-7/" + MANIFEST_NAME
    assert parse_target("s3://my-bucket/a/checkpoint-12").step == 12
    assert parse_target("s3://my-bucket/a").step is None
    for bad in ("/tmp/x", "s3://", "s3://B/x", "s3://ok-bucket/a/../b", "gs://bucket/x"):
        with pytest.raises(ConfigError, match=r"remote_dir|checkpoint") as info:
            parse_remote(bad)
        assert bad in str(info.value) or "bucket" in str(info.value)


# -- upload and what is complete -------------------------------------------------------------------------------


def test_upload_makes_a_complete_checkpoint_and_download_is_bit_exact(bucket: Bucket, tmp_path: Path) -> None:
    sizes = {**SMALL, "big/optimizer.bin": PART_BYTES + 12345, "empty.txt": 0}  # two parts, a folder, an empty file
    info = make_checkpoint(tmp_path / "out", 6, sizes)
    store = bucket.store(parallelism=4)
    try:
        done = upload_checkpoint(store, info)
        assert done.bytes == sum(sizes.values()) and not done.already
        complete, unusable = scan_remote(store)
        assert [c.step for c in complete] == [6] and unusable == []
        assert upload_checkpoint(store, info).already, "the same checkpoint again sends nothing"
        assert verify_remote(store, complete[0]).ok
        copy = download_checkpoint(store, complete[0], tmp_path / "elsewhere")
    finally:
        store.close()
    for name in sizes:
        assert (copy.path / name).read_bytes() == (info.path / name).read_bytes()
    assert (copy.path / MANIFEST_NAME).read_bytes() == (info.path / MANIFEST_NAME).read_bytes()
    assert not [p for p in (tmp_path / "elsewhere").iterdir() if p.name.startswith(STAGING_PREFIX)]


def test_objects_without_their_manifest_are_never_complete(bucket: Bucket, tmp_path: Path) -> None:
    """What a kill between the objects and the manifest leaves, and a multipart upload never completed: neither is
    taken by the listing, by `latest`, or by a checkpoint URL."""
    info = make_checkpoint(tmp_path / "out", 3, SMALL)
    store = bucket.store()
    try:
        for name, size in info.manifest.files.items():  # every object, then the kill: no manifest
            store.upload(
                info.path / name,
                bucket.remote.checkpoint_key(3, name),
                name=name,
                size=size,
                digest=info.manifest.digests[name],
                progress=None,
            )
        # A multipart upload begun and never completed: S3 shows no object at all.
        client = store.client
        pending = client.create_multipart_upload(Bucket=bucket.name, Key=bucket.remote.checkpoint_key(4, "x.bin"))
        client.upload_part(
            Bucket=bucket.name,
            Key=bucket.remote.checkpoint_key(4, "x.bin"),
            UploadId=pending["UploadId"],
            PartNumber=1,
            Body=b"x" * 100,
        )
        complete, unusable = scan_remote(store)
        assert complete == []
        assert [(u.step, u.damaged) for u in unusable] == [(3, False)]
        with pytest.raises(CheckpointError, match=f"has no {MANIFEST_NAME}"):
            find_remote(store, 3)
    finally:
        store.close()
    fresh = resolve("latest", tmp_path / "fresh", "full", remote=bucket.url)
    assert fresh.info is None, "nothing complete anywhere: a fresh start"


def test_manifest_is_written_only_if_absent(bucket: Bucket, tmp_path: Path) -> None:
    store = bucket.store()
    try:
        key = bucket.remote.manifest_key(9)
        assert store.put_if_absent(key, b"first")
        assert not store.put_if_absent(key, b"second"), "a conditional write refuses to replace (412)"
        assert store.get(key, limit=100) == b"first"
    finally:
        store.close()


def test_a_different_checkpoint_of_the_same_step_stops_being_complete_before_it_is_replaced(
    bucket: Bucket, tmp_path: Path
) -> None:
    first = make_checkpoint(tmp_path / "a", 5, SMALL)
    second = make_checkpoint(tmp_path / "b", 5, {**SMALL, "extra.bin": 10})
    store = bucket.store()
    try:
        upload_checkpoint(store, first)
        upload_checkpoint(store, second)
        (only,) = scan_remote(store)[0]
        assert only.manifest_bytes == (second.path / MANIFEST_NAME).read_bytes()
        assert verify_remote(store, only).ok
    finally:
        store.close()


def test_a_local_file_changed_since_its_commit_is_not_uploaded(bucket: Bucket, tmp_path: Path) -> None:
    big = {"optimizer.bin": PART_BYTES + 100, "small.bin": 50}
    for step, name in enumerate(big, start=2):  # the last part of a multipart upload, and a single PUT
        info = make_checkpoint(tmp_path / name, step, big)
        data = bytearray((info.path / name).read_bytes())
        data[-1] ^= 0xFF
        (info.path / name).write_bytes(bytes(data))
        store = bucket.store()
        try:
            with pytest.raises(DigestMismatch, match=f"{name} has content digest"):
                upload_checkpoint(store, info)
            assert bucket.remote.checkpoint_key(step, name) not in store.objects(""), "never completed in the bucket"
            assert scan_remote(store)[0] == []
            uploads = store.client.list_multipart_uploads(Bucket=bucket.name).get("Uploads") or []
            assert uploads == [], "the multipart upload was aborted"
        finally:
            store.close()


# -- damage in the bucket ----------------------------------------------------------------------------------------


def test_a_flipped_byte_in_the_bucket_is_refused_naming_the_object(bucket: Bucket, tmp_path: Path) -> None:
    old = make_checkpoint(tmp_path / "out", 4, SMALL)
    new = make_checkpoint(tmp_path / "out", 8, SMALL)
    store = bucket.store()
    try:
        upload_checkpoint(store, old)
        upload_checkpoint(store, new)
        key = bucket.remote.checkpoint_key(8, "optimizer.bin")
        data = bytearray(store.get(key, limit=1 << 20) or b"")
        data[100] ^= 0x01
        store.client.put_object(Bucket=bucket.name, Key=key, Body=bytes(data))
        report = verify_remote(store, find_remote(store, 8))
        assert not report.ok and report.bad_file == "optimizer.bin" and "content digest" in (report.problem or "")
    finally:
        store.close()
    url = f"{bucket.url}/checkpoint-8"
    with pytest.raises(CheckpointError, match=rf"{url}/optimizer.bin has content digest"):
        resolve(url, tmp_path / "resume-explicit", "full")
    assert list_checkpoints(tmp_path / "resume-explicit") == [], "a refused download leaves no checkpoint"
    assert not [p for p in (tmp_path / "resume-explicit").iterdir() if p.name.startswith(STAGING_PREFIX)]
    # latest passes over it, naming it, and takes the older one from the bucket.
    chosen = resolve("latest", tmp_path / "resume-latest", "full", remote=bucket.url)
    assert chosen.info is not None and chosen.info.step == 4
    assert any("checkpoint-8/optimizer.bin has content digest" in line for line in chosen.skipped)


def test_a_missing_object_is_refused_naming_it(bucket: Bucket, tmp_path: Path) -> None:
    info = make_checkpoint(tmp_path / "out", 4, SMALL)
    store = bucket.store()
    try:
        upload_checkpoint(store, info)
        store.delete([bucket.remote.checkpoint_key(4, "random_states_1.pkl")])
    finally:
        store.close()
    url = f"{bucket.url}/checkpoint-4"
    with pytest.raises(CheckpointError, match=rf"{url}/random_states_1.pkl is missing"):
        resolve(url, tmp_path / "r1", "full")
    with pytest.raises(CheckpointError, match=r"none passes verification.*random_states_1.pkl is missing"):
        resolve("latest", tmp_path / "r2", "full", remote=bucket.url)


# -- latest over both places -----------------------------------------------------------------------------------------


def test_latest_takes_the_newest_complete_of_disk_and_bucket(bucket: Bucket, tmp_path: Path) -> None:
    out = tmp_path / "out"
    elsewhere = tmp_path / "other-machine"
    store = bucket.store()
    try:
        upload_checkpoint(store, make_checkpoint(elsewhere, 4, SMALL))
        upload_checkpoint(store, make_checkpoint(elsewhere, 8, SMALL))
    finally:
        store.close()
    make_checkpoint(out, 4, SMALL)
    chosen = resolve("latest", out, "full", remote=bucket.url)
    assert chosen.info is not None and chosen.info.step == 8, "the bucket's newer one"
    assert chosen.info.path == out / "checkpoint-8" and chosen.report is not None and chosen.report.ok
    assert any("downloaded" in note for note in chosen.notes)
    make_checkpoint(out, 12, SMALL)
    chosen = resolve("latest", out, "full", remote=bucket.url)
    assert chosen.info is not None and chosen.info.step == 12, "the local newer one, nothing downloaded"


# -- rotation in the bucket --------------------------------------------------------------------------------------


def test_rotation_in_the_bucket_deletes_only_behind_a_newer_complete_one(bucket: Bucket, tmp_path: Path) -> None:
    out = tmp_path / "out"
    store = bucket.store()
    try:
        for step in (2, 4):
            upload_checkpoint(store, make_checkpoint(out, step, SMALL))
        # An upload of step 6 killed before its manifest: rotation must not count it as the newer one.
        six = make_checkpoint(out, 6, SMALL)
        for name, size in six.manifest.files.items():
            store.upload(
                six.path / name, bucket.remote.checkpoint_key(6, name), name=name, size=size, digest=None, progress=None
            )
        assert rotate_remote(store, 1) == [f"{bucket.url}/checkpoint-2"]
        assert [c.step for c in scan_remote(store)[0]] == [4], "4 stays: 6 is not complete"
        upload_checkpoint(store, six)
        assert rotate_remote(store, 1) == [f"{bucket.url}/checkpoint-4"]
        assert [c.step for c in scan_remote(store)[0]] == [6]
        assert not [k for k in store.objects("") if "/checkpoint-4/" in k or "/checkpoint-2/" in k]
    finally:
        store.close()


def test_remote_victims_never_takes_the_newest_full_one(bucket: Bucket, tmp_path: Path) -> None:
    store = bucket.store()
    try:
        upload_checkpoint(store, make_checkpoint(tmp_path, 2, SMALL))
        upload_checkpoint(store, make_checkpoint(tmp_path, 4, SMALL, kind="weights"))
        complete, unusable = scan_remote(store)
    finally:
        store.close()
    victims, _ = remote_victims(complete, unusable, 1)
    assert victims == [], "2 is the newest full checkpoint"
    assert remote_victims(complete, unusable, None) == ([], [])


# -- the start-up probe --------------------------------------------------------------------------------------------


def probe_error(url: str) -> ObjectStoreError:
    store = ObjectStore(parse_remote(url), attempts=1)
    try:
        with pytest.raises(ObjectStoreError) as info:
            store.probe()
    finally:
        store.close()
    return info.value


def test_probe_refuses_a_missing_bucket_wrong_credentials_and_an_unreachable_endpoint(bucket: Bucket) -> None:
    error = probe_error("s3://no-such-bucket-here/x")
    assert "'no-such-bucket-here'" in str(error) and "does not exist" in str(error) and not error.transient
    with authentication(), environment({"AWS_ACCESS_KEY_ID": "AKIAWRONGWRONGWRONG1", "AWS_SECRET_ACCESS_KEY": "nope"}):
        error = probe_error(bucket.url)
    assert "refused the credentials" in str(error) and "InvalidAccessKeyId" in str(error) and not error.transient
    with environment({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}):
        error = probe_error(bucket.url)
    assert "cannot reach the object store" in str(error) and error.transient
    assert "\n" not in str(error)
    assert os.environ["AWS_ENDPOINT_URL"] == bucket.server.endpoint, "the environment is restored"


def test_processes_that_download_the_same_checkpoint_at_once_share_one_copy(bucket: Bucket, tmp_path: Path) -> None:
    """Ranks that resolve on their own (the Trainer callback before its ranks are known) download into one
    output_dir at the same time: each gets the one complete copy, nothing is moved aside."""
    info = make_checkpoint(tmp_path / "src", 4, {**SMALL, "optimizer.bin": PART_BYTES + 1})
    store = bucket.store()
    try:
        upload_checkpoint(store, info)
        (checkpoint,) = scan_remote(store)[0]
        out = tmp_path / "shared"
        with ThreadPoolExecutor(3) as pool:
            copies = list(pool.map(lambda _: download_checkpoint(store, checkpoint, out), range(3)))
    finally:
        store.close()
    assert {c.path for c in copies} == {out / "checkpoint-4"}
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-4"], "no staging left, nothing moved aside"
