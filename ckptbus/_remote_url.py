"""Object-storage locations: ``s3://bucket/prefix`` parsed, checked, and turned into object keys.

A run's ``remote_dir`` names a bucket and a prefix; its checkpoints live
under ``<prefix>/checkpoint-<step>/``, every file of the local checkpoint as
one object of the same relative name, the manifest ``ckptbus.json`` last
(docs/remote.md). Standard library only: the config checks a ``remote_dir``
with it, and the CLI tells a URL from a folder with it, without importing
any client.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from ._errors import ConfigError
from ._names import CHECKPOINT_PREFIX, MANIFEST_NAME

SCHEMES: Final = ("s3",)
"""The URL schemes ckptbus speaks (S3 and every store with an S3 API: MinIO, R2, GCS's interoperability mode)."""

URL_ALLOWED: Final = "an object-storage URL s3://BUCKET or s3://BUCKET/PREFIX (bucket: 3-63 of a-z, 0-9, '.', '-')"

_BUCKET_RE: Final = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_CHECKPOINT_RE: Final = re.compile(rf"^{re.escape(CHECKPOINT_PREFIX)}(\d+)$")


def is_remote(target: object) -> bool:
    """Whether ``target`` is written as an object-storage URL (``s3://...``), right or wrong."""
    return isinstance(target, str) and any(target.startswith(f"{scheme}://") for scheme in SCHEMES)


@dataclass(frozen=True, slots=True)
class RemoteDir:
    """A bucket and a prefix in it (no leading or trailing ``/``; empty for the bucket's top)."""

    bucket: str
    prefix: str = ""

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def key(self, *parts: str) -> str:
        """The object key of ``parts`` below the prefix, joined with ``/``."""
        return "/".join(p for p in (self.prefix, *parts) if p)

    def checkpoint_key(self, step: int, name: str = "") -> str:
        """``<prefix>/checkpoint-<step>/`` (``name`` empty), or the key of the file ``name`` in it."""
        folder = self.key(f"{CHECKPOINT_PREFIX}{step}")
        return f"{folder}/{name}"

    def manifest_key(self, step: int) -> str:
        return self.checkpoint_key(step, MANIFEST_NAME)

    def checkpoint_url(self, step: int) -> str:
        return f"s3://{self.bucket}/{self.checkpoint_key(step).rstrip('/')}"

    def __str__(self) -> str:
        return self.url


def parse_remote(url: str, *, key: str = "remote_dir") -> RemoteDir:
    """``s3://bucket[/prefix]`` as a :class:`RemoteDir`. Raises :class:`ConfigError` naming ``key``, the value and
    what is allowed."""
    scheme, sep, rest = url.partition("://") if isinstance(url, str) else ("", "", "")
    if not sep or scheme not in SCHEMES:
        raise ConfigError(f"config key '{key}': got {url!r}, expected {URL_ALLOWED}")
    bucket, _, prefix = rest.partition("/")
    prefix = prefix.strip("/")
    parts = prefix.split("/") if prefix else []
    if not _BUCKET_RE.match(bucket) or ".." in bucket:
        raise ConfigError(
            f"config key '{key}': bucket {bucket!r} of {url!r} is not a bucket name; expected {URL_ALLOWED}"
        )
    if any(p in ("", ".", "..") for p in parts) or "\0" in prefix:
        raise ConfigError(f"config key '{key}': prefix {prefix!r} of {url!r} has an empty, '.' or '..' part")
    return RemoteDir(bucket, prefix)


@dataclass(frozen=True, slots=True)
class RemoteTarget:
    """What a remote URL given to resume or the CLI names: a remote_dir, and a step if it ends in checkpoint-N."""

    remote: RemoteDir
    step: int | None


def parse_target(url: str) -> RemoteTarget:
    """``s3://bucket/prefix`` (a remote_dir) or ``s3://bucket/prefix/checkpoint-N`` (one checkpoint in it).
    Raises :class:`ConfigError` for a URL that is neither."""
    location = parse_remote(url, key="checkpoint")
    head, _, last = location.prefix.rpartition("/")
    match = _CHECKPOINT_RE.match(last)
    if match:
        return RemoteTarget(RemoteDir(location.bucket, head), int(match.group(1)))
    return RemoteTarget(location, None)


def step_of_folder(name: str) -> int | None:
    """The step of a ``checkpoint-<step>`` folder name, else None."""
    match = _CHECKPOINT_RE.match(name)
    return int(match.group(1)) if match else None


__all__ = [
    "SCHEMES",
    "URL_ALLOWED",
    "RemoteDir",
    "RemoteTarget",
    "is_remote",
    "parse_remote",
    "parse_target",
    "step_of_folder",
]
