"""publish_artifact: the assembled checkpoint into the registry as name:version, with lineage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from vptq_service.tasks.model import no_retry_on_bad_input


def next_version(versions: list[str]) -> str:
    """v1, v2, ...: one more than the highest vN published so far."""
    nums = [int(v[1:]) for v in versions if v[:1] == "v" and v[1:].isdigit()]
    return f"v{max(nums, default=0) + 1}"


@task(retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=no_retry_on_bad_input, cache_policy=NO_CACHE)
def publish_artifact(folder: str, name: str, version: str | None, job_id: int,
                     lineage: dict[str, Any], status: str = "published") -> dict[str, Any]:
    """Upload folder as name:version (default: next vN) and record it; a job publishes once.

    status "rejected" (the job's perplexity gate failed) keeps the version but never as latest."""
    from vptq_service.store.artifacts import open_artifact_store
    from vptq_service.store.registry import Registry
    from vptq_service.store.repository import Repository

    repo = Repository.open()
    try:
        mine = [a for a in repo.list_artifacts(name) if a.job_id == job_id]
        if not mine:
            registry = Registry(open_artifact_store(), repo)
            version = version or next_version([m.version for m in registry.list(name)])
            registry.publish(name, version, Path(folder), lineage, job_id=job_id, status=status)
            mine = [repo.get_artifact(name, version)]
        a = mine[0]
        return {"artifact_id": a.id, "name": a.name, "version": a.version, "ref": a.ref, "uri": a.uri,
                "size": a.size, "sha256": a.sha256, "status": a.status}
    finally:
        repo.close()
