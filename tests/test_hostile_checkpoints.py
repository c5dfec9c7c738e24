"""Hostile disks and hostile hands (issue 24): a checkpoint is read only inside itself, only regular files, and
nothing hangs.

Every case is a real folder on disk written here (tests/test_verify.py's
``write_checkpoint``: real files, a manifest with their sizes and digests),
then damaged the way the issue found: a manifest that lists a path outside
the checkpoint, a listed file that is a symbolic link out of it or a FIFO,
a file the manifest does not list, a ``checkpoint-<step>`` that is a link, a
manifest of another step. Each is checked through every reader: the layout
(``read_checkpoint``, listing, rotation), the verification, ``latest``, and
``ckptbus verify`` / ``ckptbus list`` in process. The rules are
docs/integrity.md's. One end-to-end test resumes on 2 ranks through
``accelerate launch`` past a checkpoint holding an unlisted damaged file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from runs import CHECKPOINTS_AT_4_AND_8, TrainingRun
from test_verify import FILES, flip, write_checkpoint

from ckptbus import CheckpointError, Manifest, list_checkpoints, read_checkpoint
from ckptbus._contained import MANIFEST_TMP_NAME
from ckptbus._digest import digest_file
from ckptbus._layout import (
    CheckpointInfo,
    clean_leftovers,
    commit,
    prepare_staging,
    rotate,
    scan_checkpoints,
    write_manifest,
)
from ckptbus._names import MANIFEST_NAME, TRASH_PREFIX
from ckptbus._resume import resolve
from ckptbus._verify import verify_checkpoint
from ckptbus.cli import main

T = TypeVar("T")


def finishes(call: Callable[[], T], seconds: float = 20.0) -> T:
    """``call()``, failing the test (instead of hanging it) if it does not return within ``seconds``."""
    result: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            result.append(call())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s: it blocks"
    if errors:
        raise errors[0]
    return result[0]


def edit_manifest(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    data = json.loads((path / MANIFEST_NAME).read_text())
    change(data)
    (path / MANIFEST_NAME).write_text(json.dumps(data), encoding="utf-8")


def list_also(path: Path, name: str, size: int, digest: str) -> None:
    """Add ``name`` to the manifest of ``path`` with ``size`` and ``digest`` (a hand-edited manifest)."""

    def change(data: dict[str, Any]) -> None:
        data["files"][name] = size
        data["digests"][name] = digest

    edit_manifest(path, change)


def unlist(path: Path, name: str) -> None:
    """Drop ``name`` from the manifest of ``path`` (file, size and digest), leaving the file where it is."""

    def change(data: dict[str, Any]) -> None:
        del data["files"][name]
        del data["digests"][name]

    edit_manifest(path, change)


def by_hand(path: Path) -> CheckpointInfo:
    """The manifest of ``path`` as a :class:`CheckpointInfo`, without read_checkpoint's checks (verification
    must hold on its own, for callers that built one)."""
    return CheckpointInfo(path, Manifest.from_dict(json.loads((path / MANIFEST_NAME).read_text())))


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def secret(tmp_path: Path) -> Iterator[Path]:
    """A file outside every checkpoint, which must never be read through one."""
    path = tmp_path / "secret.txt"
    path.write_bytes(b"password: hunter2\n")
    yield path
    assert path.read_bytes() == b"password: hunter2\n", "nothing outside is ever changed"


# -- 1. reads outside the checkpoint ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("../../secret.txt", "climbs out with '..'"),
        ("sub/../../../secret.txt", "climbs out with '..'"),
        ("ABSOLUTE", "an absolute path"),
        ("./model.safetensors", "not a plain relative path"),
        ("sub//x.bin", "not a plain relative path"),
        (MANIFEST_NAME, "ckptbus's own manifest file"),
    ],
)
def test_a_listed_path_outside_the_checkpoint_is_refused_even_with_a_matching_digest(
    tmp_path: Path, secret: Path, capsys: pytest.CaptureFixture[str], name: str, why: str
) -> None:
    out = tmp_path / "out"
    write_checkpoint(out, 10)
    path = write_checkpoint(out, 20)
    name = str(secret) if name == "ABSOLUTE" else name
    list_also(path, name, secret.stat().st_size, digest_file(secret))  # the digest matches: still refused
    with pytest.raises(
        CheckpointError, match=re.escape(f"is refused: the manifest lists {name!r}: ") + ".*" + re.escape(why)
    ):
        read_checkpoint(path)
    report = verify_checkpoint(by_hand(path), "full")
    assert not report.ok and report.bad_file == name and why in (report.problem or "")
    assert resolve("latest", out, "full").info == read_checkpoint(out / "checkpoint-10"), "latest falls back"
    code, stdout, _ = cli(capsys, "verify", str(path))
    assert code == 1 and "FAILED" in stdout and why in stdout


def test_a_listed_file_that_is_a_link_out_of_the_checkpoint_is_refused(tmp_path: Path, secret: Path) -> None:
    path = write_checkpoint(tmp_path, 10)
    (path / "stolen.txt").symlink_to(secret)
    list_also(path, "stolen.txt", secret.stat().st_size, digest_file(secret))
    with pytest.raises(CheckpointError, match=r"stolen.txt is a symbolic link, not a regular file inside"):
        read_checkpoint(path)
    report = verify_checkpoint(by_hand(path), "full")
    assert report.bad_file == "stolen.txt" and report.found == "symbolic link" and report.bytes_read == 0


def test_a_listed_file_below_a_folder_that_is_a_link_out_of_the_checkpoint_is_refused(
    tmp_path: Path, secret: Path
) -> None:
    path = write_checkpoint(tmp_path, 10, {"model.safetensors": b"m" * 10})
    (path / "elsewhere").symlink_to(secret.parent)
    list_also(path, "elsewhere/secret.txt", secret.stat().st_size, digest_file(secret))
    with pytest.raises(CheckpointError, match=r"elsewhere/secret.txt: elsewhere is a symbolic link, not a folder"):
        read_checkpoint(path)
    report = verify_checkpoint(by_hand(path), "full")
    assert report.bad_file == "elsewhere/secret.txt" and report.bytes_read == 0


# -- 2. nothing hangs: FIFOs, devices, links to /dev/zero -------------------------------------------------


def make_special(path: Path, kind: str) -> None:
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")


@pytest.mark.parametrize("kind", ["fifo", "dev-zero-link"])
def test_a_listed_special_file_of_size_zero_never_hangs_verify_or_a_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    out = tmp_path / "out"
    write_checkpoint(out, 10)
    path = write_checkpoint(out, 20)
    make_special(path / "extra.bin", kind)
    list_also(path, "extra.bin", 0, "xxh3_128:" + "0" * 32)
    found = "FIFO (named pipe)" if kind == "fifo" else "symbolic link"
    with pytest.raises(CheckpointError, match=rf"extra.bin is a {found.replace('(', '.').replace(')', '.')}"):
        finishes(lambda: read_checkpoint(path))
    report = finishes(lambda: verify_checkpoint(by_hand(path), "full"))
    assert report.bad_file == "extra.bin" and report.found == found
    chosen = finishes(lambda: resolve("latest", out, "full"))
    assert chosen.info is not None and chosen.info.step == 10
    assert any("checkpoint-20" in line and "extra.bin" in line for line in chosen.skipped)
    code, stdout, _ = finishes(lambda: cli(capsys, "verify", "--output-dir", str(out)))
    assert code == 1 and "checkpoint-20  FAILED" in stdout and "extra.bin" in stdout


@pytest.mark.parametrize("kind", ["fifo", "dev-zero-link"])
def test_a_manifest_that_is_a_special_file_never_hangs(tmp_path: Path, kind: str) -> None:
    path = write_checkpoint(tmp_path, 10)
    (path / MANIFEST_NAME).unlink()
    make_special(path / MANIFEST_NAME, kind)
    with pytest.raises(CheckpointError, match=r"ckptbus.json is a (FIFO|symbolic link).*not a regular file"):
        finishes(lambda: read_checkpoint(path))
    _, unusable = finishes(lambda: scan_checkpoints(tmp_path))
    assert [u.damaged for u in unusable] == [True], "a manifest was there: damaged, not a save that never completed"


def test_an_unlisted_fifo_is_refused_without_being_opened(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path, 10)
    os.mkfifo(path / "random_states_1.pkl")
    with pytest.raises(CheckpointError, match=r"random_states_1.pkl \(FIFO \(named pipe\)\) is not in the manifest"):
        finishes(lambda: read_checkpoint(path))


def test_the_checkpoint_path_itself_a_fifo_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    os.mkfifo(tmp_path / "checkpoint-3")
    with pytest.raises(CheckpointError, match="is not a directory"):
        finishes(lambda: read_checkpoint(tmp_path / "checkpoint-3"))
    code, stdout, _ = finishes(lambda: cli(capsys, "verify", "--output-dir", str(tmp_path)))
    assert code == 0 and "checkpoint-3  INCOMPLETE" in stdout


# -- 3. the files a resume loads are the files the manifest lists ------------------------------------------


@pytest.mark.parametrize("name", ["optimizer.bin", "random_states_0.pkl", "sub/shard-00001.bin"])
def test_a_file_dropped_from_the_manifest_and_damaged_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    out = tmp_path / "out"
    write_checkpoint(out, 10)
    path = write_checkpoint(out, 20)
    unlist(path, name)
    flip(path / name)
    message = f"is refused: {name} (regular file) is not in the manifest"
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_checkpoint(path)
    report = verify_checkpoint(by_hand(path), "full")
    assert not report.ok and report.bad_file == name and "a resume would load it unverified" in (report.problem or "")
    for mode in ("full", "sizes", "off"):  # what is loaded is decided before the digests: every mode refuses
        chosen = resolve("latest", out, mode)  # type: ignore[arg-type]
        assert chosen.info is not None and chosen.info.step == 10, mode
    code, stdout, _ = cli(capsys, "verify", str(path))
    assert code == 1 and f"{name} (regular file) is not in the manifest" in stdout


def test_an_extra_custom_checkpoint_is_blamed_and_latest_falls_back(tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_checkpoint(out, 10)
    path = write_checkpoint(out, 20)
    (path / "custom_checkpoint_0.pkl").write_bytes(b"not a pickle at all")
    chosen = resolve("latest", out, "full")
    assert chosen.info is not None and chosen.info.step == 10
    [line] = chosen.skipped
    assert f"skipped {path}: damaged since it was written: {path} is refused: custom_checkpoint_0.pkl" in line
    assert "model" not in line.split("custom_checkpoint_0.pkl", 1)[1].split(";")[0], "the file is blamed, not the model"
    with pytest.raises(CheckpointError, match=r"custom_checkpoint_0.pkl .regular file. is not in the manifest"):
        resolve(str(path), out, "full")


def test_a_load_failure_after_verification_blames_an_unlisted_file_not_the_model(tmp_path: Path) -> None:
    """A file that appears between verification and load_state (accelerate counts every custom_checkpoint_<n>.pkl
    in the folder) is named as the cause of the failure, not this run's model."""
    from ckptbus.plugins.integrations.load_state import _explain

    (tmp_path / "checkpoint-10").mkdir()
    path = write_checkpoint(tmp_path, 10, {})
    info = read_checkpoint(path)
    (path / "custom_checkpoint_0.pkl").write_bytes(b"appeared after verification")
    cause = RuntimeError("Number of custom checkpoints in folder does not match the number of registered objects")
    message = str(_explain(info, cause))
    assert "holds custom_checkpoint_0.pkl, which its manifest does not list" in message
    assert "does not match the ones that saved it" not in message


def test_a_checkpoint_whose_only_checkpoint_holds_an_unlisted_file_is_a_refusal_not_a_fresh_start(
    tmp_path: Path,
) -> None:
    path = write_checkpoint(tmp_path, 10)
    (path / "optimizer_1.bin").write_bytes(b"planted")
    with pytest.raises(CheckpointError, match=r"holds 1 checkpoint.s. and none passes verification"):
        resolve("latest", tmp_path, "full")


def test_what_ckptbus_tolerates_in_a_checkpoint(tmp_path: Path) -> None:
    """The manifest's temporary file (its own, never listed, never read) and empty folders are not files a
    resume loads; anything else unlisted, a link included, is refused."""
    path = write_checkpoint(tmp_path, 10)
    (path / MANIFEST_TMP_NAME).write_text("{")
    (path / "empty" / "deeper").mkdir(parents=True)
    assert verify_checkpoint(read_checkpoint(path), "full").ok
    (path / "sub" / "link.bin").symlink_to(path / "optimizer.bin")
    with pytest.raises(CheckpointError, match=r"sub/link.bin \(symbolic link\) is not in the manifest"):
        read_checkpoint(path)


def test_a_file_swapped_for_a_link_after_the_listing_is_caught_by_verification(tmp_path: Path, secret: Path) -> None:
    path = write_checkpoint(tmp_path, 10, {"a.bin": secret.read_bytes()})
    info = read_checkpoint(path)
    (path / "a.bin").unlink()
    (path / "a.bin").symlink_to(secret)  # same size, same digest: only the type tells
    report = verify_checkpoint(info, "full")
    assert report.bad_file == "a.bin" and report.found == "symbolic link" and report.bytes_read == 0


def test_write_manifest_never_lists_its_own_temporary_file_and_refuses_special_files(tmp_path: Path) -> None:
    staging = prepare_staging(tmp_path, 3)
    (staging / "model.safetensors").write_bytes(b"weights")
    (staging / MANIFEST_TMP_NAME).write_text("left by a commit in place that was interrupted")
    fields = {"step": 3, "kind": "full", "reason": "file", "world_size": 1}
    manifest = write_manifest(staging, fields)
    assert sorted(manifest.files) == ["model.safetensors"]
    assert not (staging / MANIFEST_TMP_NAME).exists()
    os.mkfifo(staging / "pipe")
    with pytest.raises(OSError, match="neither a regular file nor a directory"):
        finishes(lambda: write_manifest(staging, fields))
    (staging / "pipe").unlink()
    (staging / "link").symlink_to(staging / "model.safetensors")
    with pytest.raises(OSError, match="neither a regular file nor a directory"):
        write_manifest(staging, fields)


# -- 5. a checkpoint-<step> that is a symbolic link ----------------------------------------------------------


@pytest.fixture
def linked(tmp_path: Path) -> tuple[Path, Path]:
    """``out`` with checkpoint-10 (real) and checkpoint-20, a link to a complete checkpoint kept elsewhere."""
    out = tmp_path / "out"
    write_checkpoint(out, 10)
    real = write_checkpoint(tmp_path / "elsewhere", 20)
    (out / "checkpoint-20").symlink_to(real)
    return out, real


def test_a_linked_checkpoint_is_listed_as_unusable_with_why(
    linked: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out, real = linked
    complete, unusable = scan_checkpoints(out)
    assert [c.step for c in complete] == [10]
    [link] = unusable
    assert link.step == 20 and link.link and link.damaged
    assert "is a symbolic link" in link.why and f"Pass the real path ({real})" in link.why
    assert [c.step for c in list_checkpoints(out)] == [10]
    code, stdout, stderr = cli(capsys, "list", "--output-dir", str(out))
    assert code == 0 and "checkpoint-20" not in stdout
    assert f"not usable (damaged): {out / 'checkpoint-20'}: {out / 'checkpoint-20'} is a symbolic link" in stderr
    code, stdout, _ = cli(capsys, "list", "--output-dir", str(out), "--json")
    data = json.loads(stdout)
    assert [r["step"] for r in data["checkpoints"]] == [10]
    assert [(u["step"], u["link"], u["damaged"]) for u in data["unusable"]] == [(20, True, True)]


def test_latest_never_follows_a_linked_checkpoint_and_says_so(linked: tuple[Path, Path]) -> None:
    out, _ = linked
    chosen = resolve("latest", out, "full")
    assert chosen.info is not None and chosen.info.step == 10
    assert [line for line in chosen.skipped if "checkpoint-20" in line and "is a symbolic link" in line]
    (out / "checkpoint-10").rename(out / "moved-away")
    with pytest.raises(CheckpointError, match=r"none passes verification .checkpoint-20: .* is a symbolic link"):
        resolve("latest", out, "full")  # a link is never a quiet fresh start either


def test_a_linked_checkpoint_named_directly_is_refused_with_the_real_path(
    linked: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out, real = linked
    for target in (out / "checkpoint-20", Path(str(out / "checkpoint-20") + "/")):
        with pytest.raises(CheckpointError, match=rf"is a symbolic link .*Pass the real path \({real}\)"):
            resolve(str(target), out, "full")
    assert resolve(str(real), out, "full").info == read_checkpoint(real), "the real path resumes"
    code, stdout, _ = cli(capsys, "verify", str(out / "checkpoint-20"))
    assert code == 1 and "FAILED" in stdout and "is a symbolic link" in stdout
    code, stdout, _ = cli(capsys, "verify", "--output-dir", str(out))
    assert code == 1 and "checkpoint-20  FAILED" in stdout and "checkpoint-10  ok" in stdout


def test_rotation_and_replacement_never_follow_a_linked_checkpoint(
    linked: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    out, real = linked
    write_checkpoint(out, 30)
    assert rotate(out, 1) == [out / "checkpoint-10"], "the link is not counted, the real oldest goes"
    assert (out / "checkpoint-20").is_symlink() and read_checkpoint(real).step == 20
    staging = prepare_staging(out, 20)
    (staging / "model.safetensors").write_bytes(b"new")
    commit(staging, out / "checkpoint-20", {"step": 20, "kind": "full", "reason": "file", "world_size": 1})
    assert read_checkpoint(out / "checkpoint-20").manifest.files == {"model.safetensors": 3}
    [moved] = [p for p in out.iterdir() if p.name.startswith("checkpoint-20.orphaned-")]
    assert moved.is_symlink() and "moved it to" in caplog.text, "the link is kept aside, with a warning"
    assert sorted(p.name for p in real.iterdir()) == sorted({*(n.split("/")[0] for n in FILES), MANIFEST_NAME})


def test_a_link_left_in_the_trash_is_removed_as_a_link(linked: tuple[Path, Path]) -> None:
    out, real = linked
    trash = out / f"{TRASH_PREFIX}checkpoint-20-123"
    (out / "checkpoint-20").rename(trash)  # where an earlier version left it
    assert clean_leftovers(out) == [trash]
    assert not os.path.lexists(trash) and read_checkpoint(real).step == 20, "the link went, its target stayed"


# -- 7. the same verdict from every reader -------------------------------------------------------------------


def test_a_manifest_of_another_step_fails_verify_by_path_and_by_output_dir_alike(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_checkpoint(tmp_path, 10)
    edit_manifest(path, lambda data: data.update(step=99))
    message = f"{path}: its manifest says step 99, its name step 10"
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(path)
    code_path, by_path, _ = cli(capsys, "verify", str(path), "--json")
    code_dir, by_dir, _ = cli(capsys, "verify", "--output-dir", str(tmp_path), "--json")
    rows = [json.loads(by_path)["checkpoints"][0], json.loads(by_dir)["checkpoints"][0]]
    assert code_path == code_dir == 1
    assert [(r["status"], r["problem"]) for r in rows] == [("failed", message)] * 2
    copy = tmp_path / "best"
    shutil.copytree(path, copy)
    assert read_checkpoint(copy).step == 99, "only a checkpoint-<step> name says a step"


# -- end to end: 2 ranks through accelerate launch --------------------------------------------------------

DATA = {"dataset_size": 64, "micro_batch_size": 4, "sequence_len": 16}
NO_TRIGGERS = {"enabled": False}
Launch = Callable[..., TrainingRun]


@pytest.fixture(scope="module")
def source(shared_run: Callable[..., TrainingRun]) -> TrainingRun:
    """A finished 2-rank run with full checkpoints at steps 4 and 8 and its losses (the reference); the same run
    as tests/test_resume_integrity.py's, done once per session."""
    return shared_run(processes=2, config=CHECKPOINTS_AT_4_AND_8)


def losses(rows: list[dict[str, Any]]) -> dict[int, float]:
    return {int(r["step"]): float(r["loss"]) for r in rows if "loss" in r}


@pytest.mark.slow
def test_two_ranks_never_load_a_file_the_manifest_does_not_list(
    source: TrainingRun, launch: Launch, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    for info in list_checkpoints(source.output_dir):
        shutil.copytree(info.path, out / info.path.name)
    newest = out / "checkpoint-8"
    unlist(newest, "optimizer.bin")
    flip(newest / "optimizer.bin", offset=5000, count=4096)  # verify said ok and the resume trained on NaN

    run = launch(
        processes=2,
        config={**DATA, "output_dir": str(out), "max_steps": 8, "save_steps": 4, "dynamic_checkpoint": NO_TRIGGERS},
        extra_args=["--resume-from-checkpoint", str(newest)],
        name="named",
    )
    assert run.wait_exit(timeout=300) == 1, run.log_tail()  # torchrun's status when a worker failed
    log = run.log()
    assert f"{newest} is refused: optimizer.bin (regular file) is not in the manifest" in log, run.log_tail()
    assert not (out / "metrics.jsonl").exists(), "nothing trained"

    run = launch(
        processes=2,
        config={**DATA, "output_dir": str(out), "max_steps": 8, "save_steps": 4, "dynamic_checkpoint": NO_TRIGGERS},
        extra_args=["--resume-from-checkpoint", "latest"],
        name="latest",
    )
    assert run.wait_exit(timeout=300) == 0, run.log_tail()
    log = run.log()
    assert f"skipped {newest}: damaged since it was written: {newest} is refused: optimizer.bin" in log
    assert f"resumed from {out / 'checkpoint-4'} at step 4" in log
    resumed, reference = losses(run.metrics()), losses(source.metrics())
    assert sorted(resumed) == [5, 6, 7, 8]
    assert resumed == {s: reference[s] for s in resumed}, "exact resume from the older checkpoint, no NaN"
    assert verify_checkpoint(read_checkpoint(newest), "full").ok, "step 8 saved again, whole"
    [kept] = [p for p in out.iterdir() if p.name.startswith("checkpoint-8.orphaned-")]
    assert (kept / "optimizer.bin").is_file(), "the refused checkpoint is moved aside and kept, never deleted"
