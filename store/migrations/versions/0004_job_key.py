"""jobs.job_key: the request's identity as an indexed column (was only inside the config JSON)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05

`vptq compress`/`submit` and the scheduled flow find the job of an identical request by its key;
they scanned every job's config in Python, now they query this column. Existing rows are
backfilled from their config's `job_key`.
"""

import json
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('job_key', sa.String(length=64), nullable=True))
        batch_op.create_index(batch_op.f('ix_jobs_job_key'), ['job_key'], unique=False)
    conn = op.get_bind()
    for job_id, config in conn.execute(sa.text("SELECT id, config FROM jobs")).all():
        if isinstance(config, str):  # SQLite returns the JSON text, PostgreSQL the decoded value
            config = json.loads(config)
        key = (config or {}).get("job_key") if isinstance(config, dict) else None
        if key:
            conn.execute(sa.text("UPDATE jobs SET job_key = :key WHERE id = :id").bindparams(key=key, id=job_id))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_jobs_job_key'))
        batch_op.drop_column('job_key')
