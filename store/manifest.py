"""The artifact manifest (format, parsing, paths) and the publish protocol's small shared pieces.

A manifest names every file of a version with its size and sha256, its lineage, and (format
vptq-artifact/2) the staging prefix `root` its files were uploaded under. A manifest of a format
this code does not know raises UnknownManifestFormat: listings skip that version, a pull of it is
refused, every other version stays usable.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from vptq_service.store.errors import StoreError, StoreUsageError

MANIFEST = "manifest.json"
FORMAT = "vptq-artifact/2"  # adds `root`: the files' staging prefix
FORMAT_V1 = "vptq-artifact/1"  # files directly under NAME/VERSION/
READABLE_FORMATS = (FORMAT_V1, FORMAT)
STAGES = ("reserved", "uploading", "uploaded", "committed", "finalized")
DEFAULT_GRACE = timedelta(hours=1)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
_ROOT = re.compile(r"^data-[0-9]{8}T[0-9]{6}Z-[0-9a-f]{12}$")
_REF_HELP = "expected NAME[:VERSION] of letters, digits and . _ - (e.g. smollm2-2bit:v1)"

Progress = Callable[[int, int, str], None]  # (done, total, file)


class UnknownManifestFormat(StoreError):
    """A manifest written by a newer (or foreign) client: that version is skipped, never guessed at."""


class VersionTaken(StoreUsageError):
    """name:version is published or being published by someone else."""


def crash_point(stage: str) -> None:
    """Test-only fault point (VPTQ_TEST_CRASH_AT=stage): die like kill -9 at a named publish stage."""
    if os.environ.get("VPTQ_TEST_CRASH_AT") == stage:
        os.kill(os.getpid(), signal.SIGKILL)


def publisher_id() -> str:
    """Who holds a reservation: host:pid (liveness is checkable on the same host)."""
    return f"{socket.gethostname()[:100]}:{os.getpid()}"


def publisher_alive(publisher: str | None) -> bool | None:
    """True/False for a publisher on this host, None when it runs elsewhere (unknowable)."""
    host, _, pid = (publisher or "").rpartition(":")
    if host != socket.gethostname()[:100] or not pid.isdigit():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def new_root() -> str:
    return f"data-{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:12]}"


def next_version(versions: list[str]) -> str:
    """v1, v2, ...: one more than the highest vN taken so far."""
    nums = [int(v[1:]) for v in versions if v[:1] == "v" and v[1:].isdigit()]
    return f"v{max(nums, default=0) + 1}"


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    published_at: datetime
    files: tuple[FileEntry, ...]
    lineage: dict[str, Any]
    status: str = "published"  # "rejected": kept, but never resolved as the latest version
    root: str = ""  # the files' prefix under NAME/VERSION/ ("" for format vptq-artifact/1)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def key_of(self, f: FileEntry) -> str:
        return "/".join(x for x in (self.name, self.version, self.root, f.path) if x)

    def to_bytes(self) -> bytes:
        doc = {"format": FORMAT if self.root else FORMAT_V1, "name": self.name, "version": self.version,
               "published_at": self.published_at.isoformat(), "size": self.size,
               "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in self.files],
               "lineage": self.lineage, "status": self.status}
        if self.root:
            doc["root"] = self.root
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes, ref: str) -> Manifest:
        try:
            doc = json.loads(data)
            fmt = doc.get("format") if isinstance(doc, dict) else None
        except ValueError as e:
            raise StoreError(f"{ref}: manifest.json is corrupted ({e}); republish this version") from None
        if fmt not in READABLE_FORMATS:
            if isinstance(fmt, str) and fmt.startswith("vptq-artifact/"):
                raise UnknownManifestFormat(f"{ref}: manifest format {fmt!r} is not one this vptq reads "
                                            f"({', '.join(READABLE_FORMATS)}); upgrade vptq to pull it")
            raise StoreError(f"{ref}: manifest.json is corrupted (format {fmt!r}); republish this version")
        try:
            root = str(doc.get("root", "")) if fmt == FORMAT else ""
            if fmt == FORMAT and not _ROOT.match(root):
                raise ValueError(f"bad root {root!r}")
            if f"{doc['name']}:{doc['version']}" != ref:  # files are found by name/version: no borrowed manifest
                raise ValueError(f"it names {doc['name']}:{doc['version']}")
            files = tuple(FileEntry(_safe_path(f["path"]), int(f["size"]), str(f["sha256"])) for f in doc["files"])
            if len({f.path for f in files}) != len(files):
                raise ValueError("a file is listed twice")
            return cls(doc["name"], doc["version"], datetime.fromisoformat(doc["published_at"]), files,
                       dict(doc.get("lineage") or {}), str(doc.get("status", "published")), root)
        except (ValueError, KeyError, TypeError) as e:
            raise StoreError(f"{ref}: manifest.json is corrupted ({e}); republish this version") from None


def parse_ref(ref: str) -> tuple[str, str | None]:
    """'name' or 'name:version' -> (name, version or None); StoreError for anything else."""
    name, sep, version = ref.strip().partition(":")
    if not _NAME.match(name) or (sep and not _VERSION.match(version)):
        raise StoreUsageError(f"bad artifact reference {ref!r}: {_REF_HELP}")
    return name, (version if sep else None)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1024 * 1024), b""):
            h.update(chunk)
    return h.hexdigest()


def _safe_path(p: str) -> str:
    """A manifest path must stay inside the artifact folder (a hostile manifest must not escape dest)."""
    parts = p.split("/")
    if not p or p.startswith("/") or "\\" in p or any(x in ("", ".", "..") for x in parts) or p == MANIFEST:
        raise ValueError(f"unsafe file path {p!r}")
    return p




def is_staging_root(part: str) -> bool:
    """A path part that is an upload's staging prefix (data-<utc>-<random>)."""
    return bool(_ROOT.match(part))


def stale(row, grace: timedelta = DEFAULT_GRACE) -> bool:
    """A reservation whose publisher is gone: dead on this host, or silent for longer than grace."""
    alive = publisher_alive(row.publisher)
    if alive is not None:
        return not alive
    return datetime.now(UTC) - row.published_at > grace
