"""Registry: publish a folder as name:version, pull it back verified, list and delete versions.

Layout in the artifact store: `NAME/VERSION/manifest.json` and the files under a staging prefix
unique to the upload, `NAME/VERSION/data-<utc>-<random>/<files>`, which the manifest names
(`root`; manifests of format vptq-artifact/1 have their files directly under NAME/VERSION/).

A publish is exclusive and atomic per name:version:
1. reserve: the database row (unique name, version) is inserted as `reserved` before any byte is
   uploaded; exactly one publisher wins it (the others are refused at once);
2. upload every file under the unique staging prefix (a loser or a killed publisher never touches
   the winner's files; what it left is an orphan that `gc` removes after a grace period);
3. commit: the manifest is created only if absent (local: hard link; S3: `If-None-Match: *`), so
   without a database the manifest still has exactly one writer; readers see a version only
   through its manifest;
4. finalize the row (published/rejected, size, manifest sha256). A crash between 3 and 4 leaves a
   reserved row beside a manifest: the same job adopts it on resume, `fsck --repair` finalizes it.

A pull downloads into a fresh private folder beside dest (tempfile.mkdtemp: never a folder found
there), takes only regular files the manifest lists, verifies every sha256, fsyncs files and the
folder, and renames it into place.

Test-only fault point: VPTQ_TEST_CRASH_AT=<stage> kills the publishing process with SIGKILL at that
stage (reserved, uploading, uploaded, committed, finalized), for the crash tests; never set it
otherwise.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vptq_service.store.artifacts import ArtifactStore
from vptq_service.store.durable import current_umask, fsync_dir, fsync_file
from vptq_service.store.errors import StoreError, StoreUsageError
from vptq_service.store.manifest import (
    MANIFEST,
    FileEntry,
    Manifest,
    Progress,
    VersionTaken,
    crash_point,
    new_root,
    next_version,
    parse_ref,
    publisher_alive,
    publisher_id,
    sha256_file,
    stale,
)
from vptq_service.store.upkeep import gc

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class PullResult:
    name: str
    version: str
    dest: Path
    files: int
    downloaded: int
    reused: int  # already present and verified (dest held this version)
    size: int


@dataclass
class Listing:
    manifests: list[Manifest] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # one line per unreadable version


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

    def manifest_keys(self, name: str | None = None) -> list[tuple[str, str]]:
        """(name, version) of every manifest in the store, readable or not."""
        out = []
        for key in self.store.list_keys(f"{name}/" if name else ""):
            parts = key.split("/")
            if len(parts) == 3 and parts[2] == MANIFEST:
                out.append((parts[0], parts[1]))
        return out

    def listing(self, name: str | None = None) -> Listing:
        """Readable versions by name then newest first; an unreadable manifest (newer format,
        corrupted) is skipped with one line in `skipped`, so it never hides the other versions."""
        if name is not None:
            parse_ref(name)
        out = Listing()
        for n, v in self.manifest_keys(name):
            try:
                m = self.manifest(n, v)
            except StoreError as e:  # the message starts with NAME:VERSION
                out.skipped.append(f"skipped {e}")
                continue
            if m is not None:
                out.manifests.append(m)
        out.manifests.sort(key=lambda m: (m.name, -m.published_at.timestamp()))
        return out

    def list(self, name: str | None = None) -> list[Manifest]:
        """Published versions (those with a readable manifest), by name then newest first."""
        return self.listing(name).manifests

    def resolve(self, ref: str) -> Manifest:
        """The manifest of name:version, or of the newest readable version when none is given."""
        name, version = parse_ref(ref)
        if version is None:
            found = self.listing(name)
            versions = found.manifests
            for line in found.skipped:  # the newest readable version is taken: say what was passed over
                log.warning("%s", line)
            if not versions:
                why = f" ({'; '.join(found.skipped)})" if found.skipped else ""
                raise StoreUsageError(f"no published artifact named {name!r} in {self.store.uri}{why}")
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

    def taken_versions(self, name: str) -> set[str]:
        """Versions that exist for name: any manifest in the store (readable or not) or database row."""
        taken = {v for _, v in self.manifest_keys(name)}
        if self.repo is not None:
            taken |= {a.version for a in self.repo.list_artifacts(name, include_reserved=True)}
        return taken

    # -- publishing ------------------------------------------------------------------------

    def publish(self, name: str, version: str | None, folder: Path, lineage: dict[str, Any] | None = None,
                job_id: int | None = None, progress: Progress | None = None, status: str = "published") -> Manifest:
        """Upload every file of folder as name:version (None: the next free vN), then its manifest;
        an existing name:version is refused (VersionTaken) before anything is uploaded.

        status "rejected" keeps the version (pullable by its full name) but never as the latest.
        A job publishes once: the same job_id finds (and finishes) its earlier, interrupted publish."""
        parse_ref(f"{name}:{version or 'v1'}")
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
        lineage = dict(lineage or {})
        if job_id is not None:
            lineage.setdefault("job_id", job_id)
        if version is not None:
            return self._publish_one(name, version, files, rel, lineage, job_id, progress, status)
        for _ in range(100):  # next free vN; a concurrent publisher taking it means: try the next one
            try:
                return self._publish_one(name, next_version(sorted(self.taken_versions(name))), files, rel,
                                         lineage, job_id, progress, status)
            except VersionTaken:
                continue
        raise StoreError(f"cannot allocate a new version of {name}: 100 concurrent publishers took each one")

    def _publish_one(self, name: str, version: str, files: list[Path], rel: list[str], lineage: dict[str, Any],
                     job_id: int | None, progress: Progress | None, status: str) -> Manifest:
        ref, mkey = f"{name}:{version}", f"{name}/{version}/{MANIFEST}"
        root = new_root()
        try:
            row, previous = self._reserve(name, version, root, job_id)
        except _AlreadyMine as done:  # this job's publish finished before: publishing is idempotent per job
            return done.manifest
        committed = False
        try:
            crash_point("reserved")
            existing = self.store.get_bytes(mkey)
            if existing is not None:  # committed by a publish the database does not know (yet)
                m = self._adoptable(existing, ref, job_id)
                if m is None:
                    raise VersionTaken(f"artifact {ref} already exists; publish a new version (versions are immutable)")
                committed = True
                self._finalize(row, m, existing)
                return m
            if previous is not None:  # took over a gone publisher's reservation (no manifest: never committed)
                self._drop_dead_upload(name, version, previous)
            self._gc_quietly(name)
            entries = []
            for i, (path, key) in enumerate(zip(files, rel, strict=True)):
                entries.append(FileEntry(key, path.stat().st_size, sha256_file(path)))
                self.store.put_file(f"{name}/{version}/{root}/{key}", path)
                if i == 0:
                    crash_point("uploading")
                if progress:
                    progress(i + 1, len(files), key)
            crash_point("uploaded")
            manifest = Manifest(name, version, datetime.now(UTC), tuple(entries), lineage, status, root)
            data = manifest.to_bytes()
            if not self.store.put_bytes_exclusive(mkey, data):  # the commit point
                raise VersionTaken(f"artifact {ref} was published by another publisher meanwhile; "
                                   "publish a new version (versions are immutable)")
            committed = True
            crash_point("committed")
        except BaseException:
            if not committed:
                self._abandon(name, version, root, row)
            raise
        log.info("published %s (%d files, %d bytes) to %s", ref, len(entries), manifest.size, self.store.uri)
        self._finalize(row, manifest, data)
        crash_point("finalized")
        return manifest

    def _adoptable(self, data: bytes, ref: str, job_id: int | None) -> Manifest | None:
        """The existing manifest when it is this job's own earlier publish (resume), else None."""
        if job_id is None:
            return None
        try:
            m = Manifest.from_bytes(data, ref)
        except StoreError:
            return None
        return m if m.lineage.get("job_id") == job_id else None

    def _reserve(self, name: str, version: str, root: str, job_id: int | None):
        """Hold name:version in the database before any upload: (our row, the reservation we took over
        from a gone publisher or None); VersionTaken when someone else holds it.

        Without a database the manifest's exclusive create alone decides (after the upload)."""
        ref = f"{name}:{version}"
        if self.repo is None:
            if self.store.get_bytes(f"{name}/{version}/{MANIFEST}") is not None:
                raise VersionTaken(f"artifact {ref} already exists; publish a new version (versions are immutable)")
            return None, None
        uri, me = self.store.uri_of(f"{name}/{version}"), publisher_id()
        for _ in range(3):
            row = self.repo.reserve_artifact(name, version, uri, publisher=me, staging=root, job_id=job_id)
            if row is not None:
                return row, None
            held = self.repo.get_artifact(name, version)
            if held is None:
                continue  # released meanwhile: try again
            if held.status == "reserved" and ((job_id is not None and held.job_id == job_id) or stale(held)):
                # the same job resuming, or a publisher that is gone: take its reservation over
                taken = self.repo.take_over_reservation(held, publisher=me, staging=root, job_id=job_id)
                if taken is not None:
                    log.warning("took over the reservation of %s from %s (gone)", ref, held.publisher)
                    return taken, held
                continue
            if held.status == "reserved":
                raise VersionTaken(f"artifact {ref} is being published by {held.publisher} since "
                                   f"{held.published_at:%Y-%m-%d %H:%M:%S}Z; publish another version, or if that "
                                   "process is gone run `vptq artifacts fsck --repair`")
            if job_id is not None and held.job_id == job_id:
                data = self.store.get_bytes(f"{name}/{version}/{MANIFEST}")
                if data is not None and self._adoptable(data, ref, job_id) is not None:
                    raise _AlreadyMine(Manifest.from_bytes(data, ref))
            if self.store.get_bytes(f"{name}/{version}/{MANIFEST}") is None:
                raise VersionTaken(f"artifact {ref} is registered in the database but its manifest is missing "
                                   f"from {self.store.uri}: `vptq artifacts fsck --repair` removes the stale row")
            raise VersionTaken(f"artifact {ref} already exists; publish a new version (versions are immutable)")
        raise VersionTaken(f"artifact {ref} is contended by other publishers; publish another version")

    def _finalize(self, row, manifest: Manifest, data: bytes) -> None:
        if self.repo is None or row is None:
            return
        try:
            self.repo.finalize_artifact(row.id, size=manifest.size, sha256=hashlib.sha256(data).hexdigest(),
                                        status=manifest.status)
        except StoreError as e:  # the version is published (its manifest is the commit point)
            raise StoreError(f"{manifest.name}:{manifest.version} is published in {self.store.uri} but its database "
                             f"row could not be finalized ({e}); `vptq artifacts fsck --repair` records it") from None

    def _abandon(self, name: str, version: str, root: str, row) -> None:
        """Best effort after a failed publish: drop our staged files and our reservation."""
        try:
            self.store.delete_prefix(f"{name}/{version}/{root}/")
        except StoreError as e:
            log.warning("could not remove the staged files of %s:%s (%s); `vptq artifacts gc` will", name, version, e)
        if self.repo is not None and row is not None:
            try:
                self.repo.release_artifact(row.id, publisher=row.publisher)
            except StoreError as e:
                log.warning("could not release the reservation of %s:%s (%s); `vptq artifacts fsck --repair` "
                            "will", name, version, e)

    def _drop_dead_upload(self, name: str, version: str, previous) -> None:
        """The partial upload of a publisher whose reservation we took over, when it is known dead
        (same host, pid gone); one on another host goes to gc after the grace period."""
        if previous.staging and publisher_alive(previous.publisher) is False:
            try:
                self.store.delete_prefix(f"{name}/{version}/{previous.staging}/")
            except StoreError as e:
                log.warning("could not remove the dead upload of %s:%s (%s)", name, version, e)

    def _gc_quietly(self, name: str) -> None:
        """The cheap check at publish: orphans of this name older than the grace period."""
        try:
            gc(self.store, self.repo, name=name, quick=True)
        except StoreError as e:
            log.warning("skipped the orphan check of %s: %s", name, e)

    # -- pulling ---------------------------------------------------------------------------

    def pull(self, ref: str, dest: Path, progress: Progress | None = None) -> PullResult:
        """Download and verify name[:version] into dest; dest appears only when complete."""
        m = self.resolve(ref)
        ref = f"{m.name}:{m.version}"
        dest = Path(dest).expanduser().absolute()
        try:
            return self._pull(m, ref, dest, progress)
        except OSError as e:  # a read-only or full disk, a folder that takes no files (/proc): one line
            shown = f" ({e.filename})" if e.filename and ".partial-" not in str(e.filename) else ""
            raise StoreError(f"cannot pull {ref} into {dest}: {e.strerror or e}{shown}") from None

    def _pull(self, m: Manifest, ref: str, dest: Path, progress: Progress | None) -> PullResult:
        above = next((p for p in dest.parents if p.exists() or p.is_symlink()), None)
        if above is not None and not above.is_dir():
            raise StoreUsageError(f"cannot pull {ref} into {dest}: {above} is a file, not a folder")
        if dest.is_symlink():
            raise StoreUsageError(f"cannot pull {ref}: {dest} is a symbolic link; choose a new folder")
        if dest.exists():
            done = self._already_pulled(m, dest)
            if done is not None:
                return done
            if not dest.is_dir() or any(dest.iterdir()):
                raise StoreUsageError(f"cannot pull {ref}: {dest} exists and is not empty; choose a new folder")
        dest.parent.mkdir(parents=True, exist_ok=True)
        # A fresh private folder (0700, a new name): nothing found on disk is ever reused.
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
        try:
            for i, f in enumerate(m.files):
                self._fetch(ref, m, f, staging, dest)
                if progress:
                    progress(i + 1, len(m.files), f.path)
            (staging / MANIFEST).write_bytes(m.to_bytes())
            fsync_file(staging / MANIFEST)
            self._check_staging(ref, m, staging)
            mode = 0o777 & ~current_umask()  # mkdtemp made 0700: dest gets what a mkdir would
            for d in [staging, *(p for p in staging.rglob("*") if p.is_dir())]:
                os.chmod(d, mode)
                fsync_dir(d)
            try:
                if dest.exists():
                    dest.rmdir()  # empty: checked above
                os.rename(staging, dest)
            except OSError:
                # a concurrent pull into the same DEST finished first: fine if it holds this version
                done = self._already_pulled(m, dest) if dest.is_dir() and not dest.is_symlink() else None
                if done is None:
                    raise StoreUsageError(f"cannot pull {ref}: {dest} appeared meanwhile and is not this "
                                          "version; choose a new folder") from None
                shutil.rmtree(staging, ignore_errors=True)
                return done
            fsync_dir(dest.parent)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        log.info("pulled %s into %s (%d files)", ref, dest, len(m.files))
        return PullResult(m.name, m.version, dest, len(m.files), len(m.files), 0, m.size)

    def _fetch(self, ref: str, m: Manifest, f: FileEntry, staging: Path, dest: Path) -> None:
        """Download one file into staging, verify it and fsync it; a bad file fails the pull."""
        target = staging / f.path
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.store.get_file(m.key_of(f), target)
        except StoreError as e:
            if "is missing" in str(e):
                raise StoreError(f"{ref} is incomplete: {f.path} is missing from {self.store.uri}; nothing was "
                                 f"written to {dest}; republish this version") from None
            raise
        st = os.lstat(target)
        if not stat.S_ISREG(st.st_mode):
            raise StoreError(f"{ref}: {f.path} did not download as a regular file; nothing was written to {dest}")
        size, digest = st.st_size, sha256_file(target)
        if size != f.size or digest != f.sha256:
            raise StoreError(f"{ref} is corrupted: {f.path} has sha256 {digest[:12]}... ({size} bytes), the manifest "
                             f"says {f.sha256[:12]}... ({f.size} bytes); nothing was written to {dest}; "
                             "republish this version")
        fsync_file(target)

    def _check_staging(self, ref: str, m: Manifest, staging: Path) -> None:
        """Exactly the manifest's files, all regular: no symlink, no stray file reaches dest."""
        want = {f.path for f in m.files} | {MANIFEST}
        for p in staging.rglob("*"):
            rel = p.relative_to(staging).as_posix()
            if p.is_symlink() or not (p.is_dir() or p.is_file()):
                raise StoreError(f"{ref}: refusing {rel} in the staging folder (not a regular file); nothing "
                                 "was written")
            if p.is_file() and rel not in want:
                raise StoreError(f"{ref}: refusing {rel} in the staging folder (not in the manifest); nothing "
                                 "was written")

    def _already_pulled(self, m: Manifest, dest: Path) -> PullResult | None:
        """dest already holds exactly this version (same manifest, files verify): nothing to do."""
        have = dest / MANIFEST
        if have.is_symlink() or not have.is_file() or have.read_bytes() != m.to_bytes():
            return None
        for f in m.files:
            p = dest / f.path
            if p.is_symlink() or not p.is_file() or p.stat().st_size != f.size or sha256_file(p) != f.sha256:
                raise StoreError(f"{dest} holds {m.name}:{m.version} but {f.path} does not verify; "
                                 "remove the folder and pull again")
        return PullResult(m.name, m.version, dest, len(m.files), 0, len(m.files), m.size)

    # -- deleting --------------------------------------------------------------------------

    def delete(self, name: str, version: str) -> int:
        """Remove a version: manifest first (readers stop seeing it), then its files and row.

        A row whose files are already gone is deleted too (the database catches up with the store)."""
        parse_ref(f"{name}:{version}")
        row = self.repo.get_artifact(name, version) if self.repo is not None else None
        if row is not None and row.status == "reserved" and not stale(row):
            raise StoreUsageError(f"artifact {name}:{version} is being published by {row.publisher}; "
                                  "wait for it to finish")
        keys = self.store.list_keys(f"{name}/{version}/")
        if not keys and row is None:
            raise StoreUsageError(f"artifact {name}:{version} not found in {self.store.uri}")
        self.store.delete_key(f"{name}/{version}/{MANIFEST}")
        n = self.store.delete_prefix(f"{name}/{version}/")
        if self.repo is not None:
            self.repo.delete_artifact(name, version)
        return n + (1 if f"{name}/{version}/{MANIFEST}" in keys else 0)


class _AlreadyMine(Exception):
    """Internal: the job's own publish is already complete (carried out of _reserve)."""

    def __init__(self, manifest: Manifest) -> None:
        super().__init__(f"{manifest.name}:{manifest.version}")
        self.manifest = manifest
