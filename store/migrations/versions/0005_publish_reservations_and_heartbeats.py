"""artifact reservations (status `reserved`, publisher, staging); job heartbeats (heartbeat_at, runner)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05

A publish first inserts its name:version row as `reserved` (the unique constraint lets exactly one
publisher win before any byte is uploaded), names who holds it (`publisher`, host:pid) and where its
files are staged (`staging`), then finalizes the row to published/rejected after the manifest is
written. Jobs get a heartbeat (`heartbeat_at`, `runner`) so a job is taken over only when its runner
is gone.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD = "status IN ('published', 'rejected')"
NEW = "status IN ('reserved', 'published', 'rejected')"


def upgrade() -> None:
    with op.batch_alter_table('artifacts') as batch:
        batch.drop_constraint(op.f('ck_artifacts_status'), type_='check')
    with op.batch_alter_table('artifacts') as batch:
        batch.add_column(sa.Column('publisher', sa.String(length=128), nullable=True))
        batch.add_column(sa.Column('staging', sa.String(length=256), nullable=True))
        batch.create_check_constraint(op.f('ck_artifacts_status'), NEW)
    with op.batch_alter_table('jobs') as batch:
        batch.add_column(sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column('runner', sa.String(length=128), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.drop_column('runner')
        batch.drop_column('heartbeat_at')
    # a reservation is a publish in flight: nothing published to keep
    op.execute(sa.text("DELETE FROM artifacts WHERE status = 'reserved'"))
    with op.batch_alter_table('artifacts') as batch:
        batch.drop_constraint(op.f('ck_artifacts_status'), type_='check')
        batch.drop_column('staging')
        batch.drop_column('publisher')
    with op.batch_alter_table('artifacts') as batch:
        batch.create_check_constraint(op.f('ck_artifacts_status'), OLD)
