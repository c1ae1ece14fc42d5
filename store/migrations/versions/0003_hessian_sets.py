"""hessian_sets: the shared Hessian stage's stored sets (hessians="original")

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25

One row per Hessian set, unique by its key = hash(model sha, calibration hash, mode, nsamples,
seqlen); the job that computed it, where its files live, size, blocks and seconds.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('hessian_sets',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('key', sa.String(length=64), nullable=False),
    sa.Column('model_id', sa.Integer(), nullable=True),
    sa.Column('calibration_set_id', sa.Integer(), nullable=True),
    sa.Column('job_id', sa.Integer(), nullable=True),
    sa.Column('mode', sa.String(length=16), nullable=False),
    sa.Column('nsamples', sa.Integer(), nullable=False),
    sa.Column('seqlen', sa.Integer(), nullable=False),
    sa.Column('uri', sa.Text(), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('blocks', sa.Integer(), nullable=False),
    sa.Column('seconds', sa.Float(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint('size >= 0 AND blocks >= 0', name=op.f('ck_hessian_sets_size_blocks_nonnegative')),
    sa.ForeignKeyConstraint(['calibration_set_id'], ['calibration_sets.id'], name=op.f('fk_hessian_sets_calibration_set_id_calibration_sets'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_hessian_sets_job_id_jobs'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_hessian_sets_model_id_models'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_hessian_sets')),
    sa.UniqueConstraint('key', name=op.f('uq_hessian_sets_key'))
    )
    with op.batch_alter_table('hessian_sets', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_hessian_sets_calibration_set_id'), ['calibration_set_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_hessian_sets_model_id'), ['model_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('hessian_sets', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_hessian_sets_model_id'))
        batch_op.drop_index(batch_op.f('ix_hessian_sets_calibration_set_id'))

    op.drop_table('hessian_sets')
