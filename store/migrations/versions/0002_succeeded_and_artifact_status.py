"""job status `succeeded` (was `completed`); artifact status (published | rejected)

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25

The job lifecycle is queued -> running -> succeeded | failed | crashed | cancelled, as the
pipeline's contract spells it. An artifact whose evaluation exceeded the job's perplexity gate is
kept but `rejected`, so it never resolves as the latest version.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD = "status IN ('queued', 'running', 'completed', 'failed', 'crashed', 'cancelled')"
NEW = "status IN ('queued', 'running', 'succeeded', 'failed', 'crashed', 'cancelled')"


def _swap_job_status(old_value: str, new_value: str, new_check: str) -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.drop_constraint(op.f('ck_jobs_status'), type_='check')
    op.execute(sa.text("UPDATE jobs SET status = :new WHERE status = :old").bindparams(new=new_value, old=old_value))
    with op.batch_alter_table('jobs') as batch:
        batch.create_check_constraint(op.f('ck_jobs_status'), new_check)


def upgrade() -> None:
    _swap_job_status('completed', 'succeeded', NEW)
    with op.batch_alter_table('artifacts') as batch:
        batch.add_column(sa.Column('status', sa.String(length=16), nullable=False, server_default='published'))
        batch.create_check_constraint(op.f('ck_artifacts_status'), "status IN ('published', 'rejected')")


def downgrade() -> None:
    with op.batch_alter_table('artifacts') as batch:
        batch.drop_constraint(op.f('ck_artifacts_status'), type_='check')
        batch.drop_column('status')
    _swap_job_status('succeeded', 'completed', OLD)
