"""store: everything that persists — lineage database (SQLAlchemy + Alembic) and artifact registry.

Public surface: `Repository` (lineage rows as plain dataclasses), `Registry` (publish / pull
name:version with a sha256 manifest), `open_artifact_store()` and `StoreError`. Nothing here is
imported by vptq/ or kernels/.
"""

from vptq_service.store.errors import StoreError, mask_url

__all__ = ["StoreError", "mask_url"]
