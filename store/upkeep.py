"""Upkeep of the artifact store: `gc` (orphaned uploads) and `fsck` (drift between store and database).

gc removes what no manifest references: the staging prefixes of killed or losing publishers and
leftover temp files, once their newest object is older than the grace period (a publish in flight
keeps writing, and a reservation held by a live publisher is never touched). A reservation whose
publisher is known dead (same host, pid gone) frees its staging prefix at once. A version whose
manifest cannot be read (a newer format) is never touched.

fsck compares the store's manifests with the database's rows and, with repair, makes them agree:
- a manifest without a row: the row is added (the manifest is the commit point: it was published);
- a reservation beside a manifest (a crash between commit and finalize): the row is finalized;
- a reservation of a gone publisher without a manifest: the row and its staged files are removed;
- a row whose manifest is gone, or a manifest whose files are missing: the version is removed
  (it could never be pulled; the row no longer blocks republishing it);
- orphans: as gc.
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta

from vptq_service.store.artifacts import ArtifactStore, StoredObject
from vptq_service.store.errors import StoreError
from vptq_service.store.manifest import (
    DEFAULT_GRACE,
    MANIFEST,
    Manifest,
    is_staging_root,
    publisher_alive,
    stale,
)

log = logging.getLogger(__name__)


@dataclass
class Orphan:
    prefix: str  # a staging prefix "name/version/data-.../" or one leftover key
    objects: int
    bytes: int
    age_s: float


@dataclass
class GcReport:
    removed: list[Orphan] = field(default_factory=list)  # or, in a dry run, what would be
    kept_recent: int = 0  # unreferenced but younger than the grace period (maybe a publish in flight)
    dry_run: bool = False

    def to_dict(self) -> dict:
        return {"dry_run": self.dry_run, "removed": [asdict(o) for o in self.removed],
                "objects": sum(o.objects for o in self.removed), "bytes": sum(o.bytes for o in self.removed),
                "kept_recent": self.kept_recent}


@dataclass
class Finding:
    kind: str  # manifest-without-row, reserved-committed, stale-reservation, row-without-files,
    #            incomplete, row-mismatch, unreadable
    ref: str
    detail: str
    repaired: bool = False
    repairable: bool = True


@dataclass
class FsckReport:
    findings: list[Finding]
    orphans: GcReport
    in_flight: list[str]

    @property
    def clean(self) -> bool:
        """No drift left (everything found was repaired) and no orphans left."""
        return all(f.repaired or not f.repairable for f in self.findings) and (not self.orphans.removed or not self.orphans.dry_run)

    def to_dict(self) -> dict:
        return {"clean": self.clean, "findings": [asdict(f) for f in self.findings],
                "orphans": self.orphans.to_dict(), "in_flight": self.in_flight}


def _by_version(objects: list[StoredObject]) -> dict[tuple[str, str], list[StoredObject]]:
    out: dict[tuple[str, str], list[StoredObject]] = defaultdict(list)
    for o in objects:
        parts = o.key.split("/")
        if len(parts) >= 3:
            out[(parts[0], parts[1])].append(o)
    return out


def _manifest(store: ArtifactStore, n: str, v: str) -> tuple[Manifest, bytes] | None:
    data = store.get_bytes(f"{n}/{v}/{MANIFEST}")
    return None if data is None else (Manifest.from_bytes(data, f"{n}:{v}"), data)


def _unit(n: str, v: str, key: str) -> str:
    """What is removed together: a whole staging prefix, or one loose key."""
    parts = key.split("/")
    return f"{n}/{v}/{parts[2]}/" if len(parts) > 3 and is_staging_root(parts[2]) else key


def _plainly_complete(n: str, v: str, group: list[StoredObject]) -> bool:
    """A committed version with nothing beside it: its manifest and one staging prefix (format 2), or
    only its manifest's loose files (format 1) with no temp file; the quick check reads no manifest."""
    units = {_unit(n, v, o.key) for o in group} - {f"{n}/{v}/{MANIFEST}"}
    roots = {u for u in units if u.endswith("/")}
    tmp = any(o.key.rsplit("/", 1)[-1].startswith(".tmp-") for o in group)
    has_manifest = any(o.key == f"{n}/{v}/{MANIFEST}" for o in group)
    return has_manifest and not tmp and (len(roots) == len(units) == 1 or not roots)


def gc(store: ArtifactStore, repo=None, name: str | None = None, grace: timedelta = DEFAULT_GRACE,
       dry_run: bool = False, quick: bool = False) -> GcReport:
    """Remove unreferenced objects older than grace (of one name, or the whole store); repo (a
    Repository, optional) tells which staging prefixes belong to publishes in flight. quick (the
    check at publish) skips versions that plainly hold nothing else, reading no manifest for them."""
    now = datetime.now(UTC)
    report = GcReport(dry_run=dry_run)
    reserved = {}
    if repo is not None:
        reserved = {(a.name, a.version): a for a in repo.list_artifacts(name, include_reserved=True)
                    if a.status == "reserved"}
    for (n, v), group in sorted(_by_version(store.list_objects(f"{name}/" if name else "")).items()):
        mkey = f"{n}/{v}/{MANIFEST}"
        referenced: set[str] = set()
        if quick and _plainly_complete(n, v, group):
            continue
        if any(o.key == mkey for o in group):
            try:
                found = _manifest(store, n, v)
            except StoreError:
                continue  # unreadable (a newer format?): never delete what we cannot read
            if found is None:  # deleted meanwhile
                continue
            m = found[0]
            referenced = {mkey} | {m.key_of(f) for f in m.files}
        units: dict[str, list[StoredObject]] = defaultdict(list)
        for o in group:
            if o.key in referenced:
                continue
            units[_unit(n, v, o.key)].append(o)
        row = reserved.get((n, v))
        for unit, members in sorted(units.items()):
            held = row is not None and row.staging is not None and unit == f"{n}/{v}/{row.staging}/"
            if held and publisher_alive(row.publisher) is not False and not stale(row, grace):
                continue  # a publish in flight
            age = (now - max(o.modified for o in members)).total_seconds()
            dead = held and publisher_alive(row.publisher) is False
            if age < grace.total_seconds() and not dead:
                report.kept_recent += len(members)
                continue
            report.removed.append(Orphan(unit, len(members), sum(o.size for o in members), round(age, 1)))
            if not dry_run:
                if unit.endswith("/"):
                    store.delete_prefix(unit)
                else:
                    store.delete_key(unit)
    if report.removed and not dry_run:
        log.info("gc removed %d orphaned objects (%d bytes) from %s", sum(o.objects for o in report.removed),
                 sum(o.bytes for o in report.removed), store.uri)
    return report


def fsck(store: ArtifactStore, repo, repair: bool = False, grace: timedelta = DEFAULT_GRACE) -> FsckReport:
    """Report (and with repair, fix) drift between the store and the database (a Repository); then gc."""
    if repo is None:
        raise StoreError("fsck needs the lineage database (VPTQ_DB_URL)")
    findings: list[Finding] = []
    in_flight: list[str] = []
    keys = [o.key for o in store.list_objects("")]  # every object: a file named .tmp-x is not "missing"
    present = set(keys)
    manifests = {(k.split("/")[0], k.split("/")[1]) for k in keys
                 if len(k.split("/")) == 3 and k.endswith(f"/{MANIFEST}")}
    rows = {(a.name, a.version): a for a in repo.list_artifacts(include_reserved=True)}

    for n, v in sorted(manifests):
        ref = f"{n}:{v}"
        try:
            found = _manifest(store, n, v)
        except StoreError as e:
            findings.append(Finding("unreadable", ref, str(e), repairable=False))
            continue
        if found is None:
            continue
        m, data = found
        digest = hashlib.sha256(data).hexdigest()
        missing = [f.path for f in m.files if m.key_of(f) not in present]
        row = rows.get((n, v))
        if missing:
            f = Finding("incomplete", ref, f"{len(missing)} of {len(m.files)} files missing "
                        f"(e.g. {missing[0]}): it can never be pulled; repair removes the version")
            if repair:
                _remove_version(store, repo, n, v)
                f.repaired = True
            findings.append(f)
            continue
        if row is None:
            f = Finding("manifest-without-row", ref, "published in the store, unknown to the database; "
                        "repair adds the row")
            if repair:
                job_id = m.lineage.get("job_id")
                try:
                    if job_id is not None:
                        repo.get_job(int(job_id))
                except (StoreError, ValueError, TypeError):
                    job_id = None  # lineage names a job this database does not have
                repo.record_artifact(n, v, store.uri_of(f"{n}/{v}"), m.size, digest, job_id=job_id, status=m.status)
                f.repaired = True
            findings.append(f)
        elif row.status == "reserved":
            if not stale(row, grace):
                in_flight.append(ref)
                continue
            f = Finding("reserved-committed", ref, f"the manifest is committed but the row is still reserved "
                        f"by {row.publisher} (gone); repair finalizes it")
            if repair:
                repo.finalize_artifact(row.id, size=m.size, sha256=digest, status=m.status)
                f.repaired = True
            findings.append(f)
        elif row.sha256 != digest:
            findings.append(Finding("row-mismatch", ref, "the row's manifest sha256 differs from the store's "
                                    "manifest (edited by hand?)", repairable=False))

    for (n, v), row in sorted(rows.items()):
        if (n, v) in manifests:
            continue
        ref = f"{n}:{v}"
        if row.status == "reserved":
            if not stale(row, grace):
                in_flight.append(ref)
                continue
            f = Finding("stale-reservation", ref, f"reserved by {row.publisher} (gone) since "
                        f"{row.published_at:%Y-%m-%d %H:%M:%S}Z, never committed; repair removes it and its "
                        "staged files")
            if repair:
                if row.staging:
                    store.delete_prefix(f"{n}/{v}/{row.staging}/")
                repo.release_artifact(row.id, publisher=row.publisher)
                f.repaired = True
        else:
            f = Finding("row-without-files", ref, "in the database but its manifest is gone from the store; "
                        "repair removes the row (then the version can be republished)")
            if repair:
                _remove_version(store, repo, n, v)
                f.repaired = True
        findings.append(f)

    orphans = gc(store, repo, grace=grace, dry_run=not repair)
    for f in findings:
        if not f.repairable:
            f.repaired = False
    return FsckReport(findings, orphans, sorted(in_flight))


def _remove_version(store: ArtifactStore, repo, n: str, v: str) -> None:
    """Manifest first (readers stop seeing it), then the files, then the row."""
    store.delete_key(f"{n}/{v}/{MANIFEST}")
    store.delete_prefix(f"{n}/{v}/")
    repo.delete_artifact(n, v)
