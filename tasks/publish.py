"""publish_artifact: the assembled checkpoint into the registry as name:version, with lineage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from vptq_service.store.manifest import next_version
from vptq_service.tasks.model import no_retry_on_bad_input

__all__ = ["next_version", "publish_artifact"]


@task(retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=no_retry_on_bad_input, cache_policy=NO_CACHE)
def publish_artifact(folder: str, name: str, version: str | None, job_id: int,
                     lineage: dict[str, Any], status: str = "published") -> dict[str, Any]:
    """Upload folder as name:version (default: the next free vN) and record it; a job publishes once.

    The registry reserves the version in the database before uploading (a concurrent publisher
    gets the next vN), and a job that was interrupted mid-publish (even between the manifest and its
    row) finishes that same version on resume instead of publishing another one.
    status "rejected" (the job's perplexity gate failed) keeps the version but never as latest."""
    from vptq_service.store.artifacts import open_artifact_store
    from vptq_service.store.registry import Registry
    from vptq_service.store.repository import Repository

    repo = Repository.open()
    try:
        registry = Registry(open_artifact_store(), repo)
        mine = [a for a in repo.list_artifacts(name, include_reserved=True) if a.job_id == job_id]
        if mine and mine[0].status != "reserved":
            a = mine[0]
        else:
            # an interrupted publish of this job: its version (reserved row, or a manifest whose row
            # is missing) is finished, never a second one started
            theirs = [m.version for m in registry.list(name) if m.lineage.get("job_id") == job_id]
            version = mine[0].version if mine else (theirs[0] if theirs else version)
            m = registry.publish(name, version, Path(folder), lineage, job_id=job_id, status=status)
            a = repo.get_artifact(name, m.version)
            if a is None:
                from vptq_service.store.errors import StoreError

                raise StoreError(f"published {name}:{m.version} but its database row is gone; "
                                 "run `vptq artifacts fsck --repair`")
        return {"artifact_id": a.id, "name": a.name, "version": a.version, "ref": a.ref, "uri": a.uri,
                "size": a.size, "sha256": a.sha256, "status": a.status}
    finally:
        repo.close()
