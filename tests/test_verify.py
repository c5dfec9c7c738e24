"""Content digests and verification: ``ckptbus._digest`` (the hash), ``ckptbus._verify`` and ``ckptbus verify``.

Checkpoints here are real folders with a manifest written by the test (the
files, their sizes and their digests), so these tests depend only on the
read side. Damage is real: bytes flipped in place, keeping the size, or a
file truncated or removed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import xxhash
from runs import REPO

from ckptbus import CheckpointError, Manifest, checkpoint_path, read_checkpoint
from ckptbus._digest import ALGORITHM, CHUNK_BYTES, Digester, digest_file
from ckptbus._names import MANIFEST_NAME
from ckptbus._verify import verify_checkpoint
from ckptbus.cli import main

DIGEST = re.compile(r"^xxh3_128:[0-9a-f]{32}$")

FILES = {
    "model.safetensors": b"m" * 3000,
    "optimizer.bin": bytes(range(256)) * 20,
    "scheduler.bin": b"s" * 100,
    "random_states_0.pkl": b"r" * 500,
    "sub/shard-00001.bin": b"d" * 700,  # sharded states live in folders
}


def write_checkpoint(
    out: Path,
    step: int,
    files: dict[str, bytes] | None = None,
    *,
    digests: bool = True,
    kind: str = "full",
    extra: dict[str, Any] | None = None,
) -> Path:
    """``out/checkpoint-<step>`` with ``files`` and a manifest recording sizes and (``digests``) digests."""
    files = FILES if files is None else files
    path = checkpoint_path(out, step)
    for name, data in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    manifest = Manifest(
        step=step,
        kind=kind,  # type: ignore[arg-type]
        reason="schedule",
        created="2026-01-01T00:00:00+00:00",
        world_size=1,
        files={name: len(data) for name, data in files.items()},
        digests={name: digest_file(path / name) for name in files} if digests else {},
        bytes=sum(len(d) for d in files.values()),
    )
    data = json.loads(manifest.to_json())
    if not digests:
        data.pop("digests", None)  # as written before digests existed
    data.update(extra or {})
    (path / MANIFEST_NAME).write_text(json.dumps(data), encoding="utf-8")
    return path


def flip(path: Path, offset: int = 10, count: int = 16) -> None:
    """Invert ``count`` bytes in place: same size, different content."""
    with open(path, "r+b") as fh:
        fh.seek(offset)
        data = fh.read(count)
        fh.seek(offset)
        fh.write(bytes(b ^ 0xFF for b in data))


# -- digests -------------------------------------------------------------------------


def test_digester_is_xxh3_128_of_everything_fed_in_order() -> None:
    digester = Digester()
    for piece in (b"abc", bytearray(b"def"), memoryview(b"ghij")[1:]):
        digester.update(piece)
    assert digester.value() == f"{ALGORITHM}:{xxhash.xxh3_128(b'abcdefhij').hexdigest()}"
    assert DIGEST.match(digester.value())
    assert Digester().value() == f"{ALGORITHM}:{xxhash.xxh3_128(b'').hexdigest()}"


def test_digest_file_reads_in_chunks_and_matches_the_digester(tmp_path: Path) -> None:
    data = os.urandom(CHUNK_BYTES + 12345)  # more than one chunk, the last one short
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    digester = Digester()
    digester.update(data)
    assert digest_file(path) == digester.value()
    with pytest.raises(FileNotFoundError):
        digest_file(tmp_path / "missing")


# -- verify_checkpoint ---------------------------------------------------------------------


def test_an_intact_checkpoint_passes_every_mode(tmp_path: Path) -> None:
    info = read_checkpoint(write_checkpoint(tmp_path, 5))
    report = verify_checkpoint(info, "full")
    assert report.ok and report.note is None and report.problem is None
    assert report.files == len(FILES)
    assert report.bytes_read == sum(len(d) for d in FILES.values())
    assert f"{info.path}: ok (5 files" in report.summary() and "verify: full" in report.summary()
    assert verify_checkpoint(info, "sizes").ok and verify_checkpoint(info, "sizes").bytes_read == 0
    off = verify_checkpoint(info, "off")
    assert off.ok and off.files == 0 and "not verified (verify: off)" in off.summary()


@pytest.mark.parametrize("name", sorted(FILES))
def test_a_same_size_flip_in_any_file_is_named_with_expected_and_found(tmp_path: Path, name: str) -> None:
    info = read_checkpoint(write_checkpoint(tmp_path, 5))
    flip(info.path / name)
    read_checkpoint(info.path)  # still "complete": every size matches
    report = verify_checkpoint(info, "full")
    assert not report.ok
    assert report.bad_file == name
    assert report.expected == info.manifest.digests[name]
    assert report.found == digest_file(info.path / name) != report.expected
    message = str(report.error())
    for part in (str(info.path), name, report.expected, report.found, "verify: full"):
        assert part in message, message
    assert verify_checkpoint(info, "sizes").ok, "sizes alone cannot see it"


def test_sizes_are_checked_before_any_content_is_read(tmp_path: Path) -> None:
    info = read_checkpoint(write_checkpoint(tmp_path, 5))
    flip(info.path / "model.safetensors")
    with open(info.path / "scheduler.bin", "r+b") as fh:
        fh.truncate(7)
    for mode in ("full", "sizes"):
        report = verify_checkpoint(info, mode)
        assert report.bad_file == "scheduler.bin" and report.bytes_read == 0
        assert (report.expected, report.found) == ("100 bytes", "7 bytes")
    (info.path / "scheduler.bin").unlink()
    report = verify_checkpoint(info, "sizes")
    assert report.found == "no file" and "scheduler.bin is missing" in str(report.problem)


def test_a_checkpoint_written_before_digests_passes_with_a_note(tmp_path: Path) -> None:
    info = read_checkpoint(write_checkpoint(tmp_path, 5, digests=False))
    assert info.manifest.digests == {}
    flip(info.path / "optimizer.bin")
    report = verify_checkpoint(info, "full")
    assert report.ok and report.bytes_read == 0
    assert report.note == "not verified: written before digests (sizes checked)"
    assert "not verified: written before digests" in report.summary()


def test_a_file_without_a_digest_is_checked_by_size_and_named(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path, 5)
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    del manifest["digests"]["scheduler.bin"]
    (path / MANIFEST_NAME).write_text(json.dumps(manifest))
    report = verify_checkpoint(read_checkpoint(path), "full")
    assert report.ok and report.undigested == ("scheduler.bin",)
    assert report.note is not None and "scheduler.bin" in report.note


def test_an_unknown_digest_algorithm_is_a_failure_that_says_so(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path, 5)
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    manifest["digests"]["model.safetensors"] = "blake3:" + "0" * 64
    (path / MANIFEST_NAME).write_text(json.dumps(manifest))
    report = verify_checkpoint(read_checkpoint(path), "full")
    assert report.bad_file == "model.safetensors" and "'blake3'" in str(report.problem)
    with pytest.raises(ValueError, match="verify mode"):
        verify_checkpoint(read_checkpoint(path), "fast")  # type: ignore[arg-type]


def test_old_manifests_without_digests_still_parse() -> None:
    manifest = Manifest.from_dict(
        {"step": 3, "kind": "full", "reason": "schedule", "created": "x", "world_size": 1, "files": {"a": 1}}
    )
    assert manifest.digests == {}


# -- ckptbus verify -------------------------------------------------------------------------


def cli(*argv: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_verify_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write_checkpoint(tmp_path, 5)
    bad = write_checkpoint(tmp_path, 9)
    flip(bad / "optimizer.bin")
    code, out, err = cli("verify", str(good), capsys=capsys)
    assert code == 0, err
    assert re.match(r"^checkpoint-5  ok  5 files, .* read in \d+\.\d\d s \(--mode full\)$", out.strip()), out
    code, out, err = cli("verify", str(good), str(bad), capsys=capsys)
    assert code == 1
    assert "checkpoint-9  FAILED  optimizer.bin has content digest xxh3_128:" in out
    assert "1 of 2 checkpoint(s) failed verification: checkpoint-9" in err
    code, out, _ = cli("verify", "--mode", "sizes", str(bad), capsys=capsys)
    assert code == 0 and "(--mode sizes)" in out


def test_verify_output_dir_checks_every_checkpoint_folder_newest_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_checkpoint(tmp_path, 5)
    write_checkpoint(tmp_path, 7, digests=False)
    truncated = write_checkpoint(tmp_path, 9)
    with open(truncated / "model.safetensors", "r+b") as fh:
        fh.truncate(10)
    (tmp_path / "checkpoint-11").mkdir()  # never completed: no manifest
    code, out, err = cli("verify", "--output-dir", str(tmp_path), capsys=capsys)
    assert code == 1, (out, err)
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == ["checkpoint-11", "checkpoint-9", "checkpoint-7", "checkpoint-5"]
    assert lines[0].startswith("checkpoint-11  INCOMPLETE  ") and f"has no {MANIFEST_NAME}" in lines[0]
    assert lines[1].startswith("checkpoint-9  FAILED  ") and "model.safetensors has 10 bytes" in lines[1]
    assert lines[2].startswith("checkpoint-7  ok  ") and "not verified: written before digests" in lines[2]
    assert lines[3].startswith("checkpoint-5  ok  ")
    assert "1 of 4 checkpoint(s) failed verification: checkpoint-9" in err

    code, out, _ = cli("verify", "--output-dir", str(tmp_path), "--json", capsys=capsys)
    result = json.loads(out)
    assert code == 1 and result["ok"] is False and result["exit_code"] == 1
    assert result["error"]["code"] == "verification_failed"
    rows = {Path(r["path"]).name: r for r in result["checkpoints"]}
    assert rows["checkpoint-9"]["status"] == "failed" and rows["checkpoint-11"]["status"] == "incomplete"
    assert rows["checkpoint-5"]["bytes_read"] == sum(len(d) for d in FILES.values())


def test_verify_flipped_bytes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_checkpoint(tmp_path, 5)
    expected = read_checkpoint(path).manifest.digests["random_states_0.pkl"]
    flip(path / "random_states_0.pkl")
    code, out, _ = cli("verify", str(path), "--json", capsys=capsys)
    row = json.loads(out)["checkpoints"][0]
    assert code == 1
    assert (row["file"], row["expected"], row["found"]) == (
        "random_states_0.pkl",
        expected,
        digest_file(path / "random_states_0.pkl"),
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["verify"], "say what: checkpoint folders, or --output-dir DIR"),
        (["verify", "x", "--output-dir", "y"], "not both"),
        (["verify", "--output-dir", "{tmp}/missing"], "does not exist"),
        (["verify", "--output-dir", "{tmp}"], "no checkpoint-<step> folder in"),
        (["verify", "--mode", "off", "x"], "invalid choice: 'off'"),
    ],
)
def test_verify_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    code, _, err = cli(*[a.format(tmp=tmp_path) for a in argv], capsys=capsys)
    assert code == 2 and message in err, err


def test_verify_of_a_folder_that_is_not_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli("verify", str(tmp_path / "nothing"), capsys=capsys)
    assert code == 0 and "INCOMPLETE" in out and "does not exist" in out
    manifest_only = write_checkpoint(tmp_path, 3)
    (manifest_only / MANIFEST_NAME).write_text("{not json")
    code, out, _ = cli("verify", str(manifest_only), capsys=capsys)
    assert code == 1 and "FAILED" in out and "is not valid JSON" in out


def test_verify_runs_without_torch(tmp_path: Path) -> None:
    """The installed command checks a checkpoint from a shell where importing torch would cost seconds."""
    path = write_checkpoint(tmp_path, 5)
    flip(path / "model.safetensors")
    code = (
        "import sys; from ckptbus.cli import main; rc = main(['verify', sys.argv[1]]); "
        "heavy = {'torch', 'accelerate', 'transformers', 'numpy', 'safetensors'} & set(sys.modules); "
        "print('HEAVY', sorted(heavy)); sys.exit(rc)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert result.returncode == 1, result.stderr
    assert "HEAVY []" in result.stdout
    assert "checkpoint-5  FAILED  model.safetensors has content digest" in result.stdout


def test_read_checkpoint_still_refuses_a_manifest_with_a_wrong_size(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path, 5)
    with open(path / "optimizer.bin", "ab") as fh:
        fh.write(b"x")
    with pytest.raises(CheckpointError, match=r"optimizer\.bin has 5121 bytes, the manifest says 5120"):
        read_checkpoint(path)


def test_the_verification_names_are_still_importable_from_the_digest_module() -> None:
    """They moved to ckptbus/_verify.py; plugins, tests and users import them from ``_digest``."""
    from ckptbus import _digest, _verify
    from ckptbus._digest import VERIFY_MODES, VerifyMode, VerifyReport
    from ckptbus._digest import verify_checkpoint as old_verify_checkpoint

    assert old_verify_checkpoint is verify_checkpoint
    assert (VERIFY_MODES, VerifyMode, VerifyReport) == (_verify.VERIFY_MODES, _verify.VerifyMode, _verify.VerifyReport)
    with pytest.raises(AttributeError, match="has no attribute 'verify_everything'"):
        _digest.verify_everything  # noqa: B018
