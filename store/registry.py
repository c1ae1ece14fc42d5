"""Registry: publish a folder as name:version, pull it back verified, list and delete versions.

Layout in the artifact store: `NAME/VERSION/<files>` and `NAME/VERSION/manifest.json`. The
manifest (every file's path, size and sha256, plus lineage ids) is written last: a version
without a manifest does not exist for readers, so an interrupted publish is invisible and can be
retried. A pull downloads into a hidden staging folder beside dest, verifies every hash, and only
then renames the folder into place; files already verified in staging are not downloaded again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vptq_service.store.artifacts import ArtifactStore
from vptq_service.store.errors import StoreError, StoreUsageError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "vptq-artifact/1"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
_REF_HELP = "expected NAME[:VERSION] of letters, digits and . _ - (e.g. smollm2-2bit:v1)"

Progress = Callable[[int, int, str], None]  # (done, total, file)


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

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def to_bytes(self) -> bytes:
        doc = {"format": FORMAT, "name": self.name, "version": self.version,
               "published_at": self.published_at.isoformat(), "size": self.size,
               "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in self.files],
               "lineage": self.lineage, "status": self.status}
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes, ref: str) -> Manifest:
        try:
            doc = json.loads(data)
            if doc.get("format") != FORMAT:
                raise ValueError(f"format {doc.get('format')!r}")
            files = tuple(FileEntry(_safe_path(f["path"]), int(f["size"]), str(f["sha256"])) for f in doc["files"])
            return cls(doc["name"], doc["version"], datetime.fromisoformat(doc["published_at"]), files,
                       dict(doc.get("lineage") or {}), str(doc.get("status", "published")))
        except (ValueError, KeyError, TypeError) as e:
            raise StoreError(f"{ref}: manifest.json is corrupted ({e}); republish this version") from None


@dataclass(frozen=True)
class PullResult:
    name: str
    version: str
    dest: Path
    files: int
    downloaded: int
    reused: int  # already present and verified (a resumed pull)
    size: int


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


class Registry:
    """publish / pull / list / delete on an ArtifactStore, optionally recording rows in a Repository."""

    def __init__(self, store: ArtifactStore, repo=None) -> None:
        self.store = store
        self.repo = repo  # store.repository.Repository or None

    @classmethod
    def open(cls, with_db: bool = False) -> Registry:
        """The registry of VPTQ_ARTIFACTS (checked reachable now); with_db also records rows in the
        lineage database of VPTQ_DB_URL."""
        from vptq_service.store.artifacts import open_artifact_store
        from vptq_service.store.repository import Repository

        store = open_artifact_store()
        store.check()
        return cls(store, Repository.open() if with_db else None)

    # -- reading ---------------------------------------------------------------------------

    def manifest(self, name: str, version: str) -> Manifest | None:
        data = self.store.get_bytes(f"{name}/{version}/{MANIFEST}")
        return None if data is None else Manifest.from_bytes(data, f"{name}:{version}")

    def list(self, name: str | None = None) -> list[Manifest]:
        """Published versions (those with a manifest), by name then newest first."""
        if name is not None:
            parse_ref(name)
        out = []
        for key in self.store.list_keys(f"{name}/" if name else ""):
            parts = key.split("/")
            if len(parts) == 3 and parts[2] == MANIFEST:
                m = self.manifest(parts[0], parts[1])
                if m is not None:
                    out.append(m)
        return sorted(out, key=lambda m: (m.name, -m.published_at.timestamp()))

    def resolve(self, ref: str) -> Manifest:
        """The manifest of name:version, or of the newest version when none is given."""
        name, version = parse_ref(ref)
        if version is None:
            versions = self.list(name)
            if not versions:
                raise StoreUsageError(f"no published artifact named {name!r} in {self.store.uri}")
            accepted = [m for m in versions if m.status != "rejected"]
            if not accepted:
                raise StoreUsageError(f"every version of {name!r} was rejected by its evaluation gate "
                                 f"({', '.join(m.version for m in versions)}): name one as {name}:VERSION")
            return accepted[0]
        m = self.manifest(name, version)
        if m is None:
            have = ", ".join(v.version for v in self.list(name)) or "none"
            raise StoreUsageError(f"artifact {name}:{version} not found in {self.store.uri} (published versions: {have})")
        return m

    # -- publishing ------------------------------------------------------------------------

    def publish(self, name: str, version: str, folder: Path, lineage: dict[str, Any] | None = None,
                job_id: int | None = None, progress: Progress | None = None, status: str = "published") -> Manifest:
        """Upload every file of folder, then its manifest; an existing name:version is refused.

        status "rejected" keeps the version (pullable by its full name) but never as the latest."""
        name_, version_ = parse_ref(f"{name}:{version}")
        assert version_ is not None
        if status not in ("published", "rejected"):
            raise StoreError(f"unknown artifact status {status!r}; expected published or rejected")
        folder = Path(folder)
        if not folder.is_dir():
            raise StoreUsageError(f"cannot publish {name}:{version}: {folder} is not a folder")
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        rel = [p.relative_to(folder).as_posix() for p in files]
        if not files:
            raise StoreError(f"cannot publish {name}:{version}: {folder} has no files")
        if MANIFEST in rel:
            raise StoreError(f"cannot publish {name}:{version}: {folder} already has a {MANIFEST}; "
                             "the registry writes its own")
        self._refuse_existing(name, version)
        entries = []
        for i, (path, key) in enumerate(zip(files, rel, strict=True)):
            entries.append(FileEntry(key, path.stat().st_size, sha256_file(path)))
            self.store.put_file(f"{name}/{version}/{key}", path)
            if progress:
                progress(i + 1, len(files), key)
        lineage = dict(lineage or {})
        if job_id is not None:
            lineage.setdefault("job_id", job_id)
        manifest = Manifest(name, version, datetime.now(UTC), tuple(entries), lineage, status)
        data = manifest.to_bytes()
        self._refuse_existing(name, version)  # narrows the window for a concurrent publisher
        self.store.put_bytes(f"{name}/{version}/{MANIFEST}", data)  # the commit point
        log.info("published %s:%s (%d files, %d bytes) to %s", name, version, len(entries), manifest.size,
                 self.store.uri)
        if self.repo is not None:
            self.repo.record_artifact(name, version, self.store.uri_of(f"{name}/{version}"), manifest.size,
                                      hashlib.sha256(data).hexdigest(), job_id=job_id, status=status)
        return manifest

    def _refuse_existing(self, name: str, version: str) -> None:
        exists = self.store.get_bytes(f"{name}/{version}/{MANIFEST}") is not None
        if not exists and self.repo is not None:
            exists = self.repo.get_artifact(name, version) is not None
        if exists:
            raise StoreUsageError(f"artifact {name}:{version} already exists; publish a new version "
                             "(versions are immutable)")

    # -- pulling ---------------------------------------------------------------------------

    def pull(self, ref: str, dest: Path, progress: Progress | None = None) -> PullResult:
        """Download and verify name[:version] into dest; dest appears only when complete."""
        m = self.resolve(ref)
        ref = f"{m.name}:{m.version}"
        dest = Path(dest).expanduser().absolute()
        if dest.exists():
            done = self._already_pulled(m, dest)
            if done is not None:
                return done
            if not dest.is_dir() or any(dest.iterdir()):
                raise StoreUsageError(f"cannot pull {ref}: {dest} exists and is not empty; choose a new folder")
        staging = dest.parent / f".{dest.name}.partial"
        staging.mkdir(parents=True, exist_ok=True)
        downloaded = reused = 0
        for i, f in enumerate(m.files):
            target = staging / f.path
            if target.is_file() and target.stat().st_size == f.size and sha256_file(target) == f.sha256:
                reused += 1
            else:
                self._fetch(ref, m, f, target, dest)
                downloaded += 1
            if progress:
                progress(i + 1, len(m.files), f.path)
        (staging / MANIFEST).write_bytes(m.to_bytes())
        if dest.exists():
            dest.rmdir()  # empty: checked above
        os.replace(staging, dest)
        log.info("pulled %s into %s (%d downloaded, %d reused)", ref, dest, downloaded, reused)
        return PullResult(m.name, m.version, dest, len(m.files), downloaded, reused, m.size)

    def _fetch(self, ref: str, m: Manifest, f: FileEntry, target: Path, dest: Path) -> None:
        """Download one file next to target, verify, then rename; a bad file is deleted, never kept."""
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".download")
        tmp.unlink(missing_ok=True)
        try:
            self.store.get_file(f"{m.name}/{m.version}/{f.path}", tmp)
        except StoreError as e:
            if "is missing" in str(e):
                raise StoreError(f"{ref} is incomplete: {f.path} is missing from {self.store.uri}; nothing was "
                                 f"written to {dest}; republish this version") from None
            raise
        size, digest = tmp.stat().st_size, sha256_file(tmp)
        if size != f.size or digest != f.sha256:
            tmp.unlink(missing_ok=True)
            raise StoreError(f"{ref} is corrupted: {f.path} has sha256 {digest[:12]}... ({size} bytes), the manifest "
                             f"says {f.sha256[:12]}... ({f.size} bytes); nothing was written to {dest}; "
                             "republish this version")
        os.replace(tmp, target)

    def _already_pulled(self, m: Manifest, dest: Path) -> PullResult | None:
        """dest already holds exactly this version (same manifest, files verify): nothing to do."""
        have = dest / MANIFEST
        if not have.is_file() or have.read_bytes() != m.to_bytes():
            return None
        for f in m.files:
            p = dest / f.path
            if not p.is_file() or p.stat().st_size != f.size or sha256_file(p) != f.sha256:
                raise StoreError(f"{dest} holds {m.name}:{m.version} but {f.path} does not verify; "
                                 "remove the folder and pull again")
        return PullResult(m.name, m.version, dest, len(m.files), 0, len(m.files), m.size)

    # -- deleting --------------------------------------------------------------------------

    def delete(self, name: str, version: str) -> int:
        """Remove a version: manifest first (readers stop seeing it), then its files and row."""
        parse_ref(f"{name}:{version}")
        if self.manifest(name, version) is None and not self.store.list_keys(f"{name}/{version}/"):
            raise StoreUsageError(f"artifact {name}:{version} not found in {self.store.uri}")
        self.store.delete_key(f"{name}/{version}/{MANIFEST}")
        n = self.store.delete_prefix(f"{name}/{version}/")
        if self.repo is not None:
            self.repo.delete_artifact(name, version)
        return n + 1
