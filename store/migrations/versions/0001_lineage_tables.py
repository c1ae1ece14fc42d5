"""lineage tables

Revision ID: 0001
Revises:
Create Date: 2026-11-25

The six lineage tables of architecture.md. Migrations never import store.models: a revision
must keep describing the schema of its time when the models move on.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0001'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('calibration_sets',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('source', sa.Text(), nullable=False),
    sa.Column('nsamples', sa.Integer(), nullable=False),
    sa.Column('seqlen', sa.Integer(), nullable=False),
    sa.Column('seed', sa.BigInteger(), nullable=False),
    sa.Column('token_hash', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint('nsamples > 0', name=op.f('ck_calibration_sets_nsamples_positive')),
    sa.CheckConstraint('seqlen > 0', name=op.f('ck_calibration_sets_seqlen_positive')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_calibration_sets'))
    )
    op.create_index(op.f('ix_calibration_sets_token_hash'), 'calibration_sets', ['token_hash'], unique=False)
    op.create_table('models',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('source_uri', sa.Text(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('architecture', sa.String(length=128), nullable=True),
    sa.Column('parameter_count', sa.BigInteger(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_models')),
    sa.UniqueConstraint('source_uri', 'sha256', name=op.f('uq_models_source_uri_sha256'))
    )
    op.create_index(op.f('ix_models_sha256'), 'models', ['sha256'], unique=False)
    op.create_table('jobs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('source_uri', sa.Text(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('config', sa.JSON(), nullable=False),
    sa.Column('model_id', sa.Integer(), nullable=True),
    sa.Column('calibration_set_id', sa.Integer(), nullable=True),
    sa.Column('code_version', sa.String(length=64), nullable=True),
    sa.Column('prefect_run_id', sa.String(length=64), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("status IN ('queued', 'running', 'completed', 'failed', 'crashed', 'cancelled')", name=op.f('ck_jobs_status')),
    sa.ForeignKeyConstraint(['calibration_set_id'], ['calibration_sets.id'], name=op.f('fk_jobs_calibration_set_id_calibration_sets'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_jobs_model_id_models'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_jobs'))
    )
    op.create_index(op.f('ix_jobs_calibration_set_id'), 'jobs', ['calibration_set_id'], unique=False)
    op.create_index(op.f('ix_jobs_created_at'), 'jobs', ['created_at'], unique=False)
    op.create_index(op.f('ix_jobs_model_id'), 'jobs', ['model_id'], unique=False)
    op.create_index(op.f('ix_jobs_prefect_run_id'), 'jobs', ['prefect_run_id'], unique=False)
    op.create_index(op.f('ix_jobs_status_created_at'), 'jobs', ['status', 'created_at'], unique=False)
    op.create_table('artifacts',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=True),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('version', sa.String(length=64), nullable=False),
    sa.Column('uri', sa.Text(), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('published_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint('size >= 0', name=op.f('ck_artifacts_size_nonnegative')),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_artifacts_job_id_jobs'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_artifacts')),
    sa.UniqueConstraint('name', 'version', name=op.f('uq_artifacts_name_version'))
    )
    op.create_index(op.f('ix_artifacts_job_id'), 'artifacts', ['job_id'], unique=False)
    op.create_index(op.f('ix_artifacts_published_at'), 'artifacts', ['published_at'], unique=False)
    op.create_table('layer_results',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=False),
    sa.Column('layer_name', sa.String(length=256), nullable=False),
    sa.Column('proxy_loss', sa.Float(), nullable=False),
    sa.Column('seconds', sa.Float(), nullable=False),
    sa.Column('bits_per_weight', sa.Float(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_layer_results_job_id_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_layer_results')),
    sa.UniqueConstraint('job_id', 'layer_name', name=op.f('uq_layer_results_job_id_layer_name'))
    )
    op.create_table('evaluations',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('artifact_id', sa.Integer(), nullable=True),
    sa.Column('model_id', sa.Integer(), nullable=True),
    sa.Column('dataset', sa.String(length=256), nullable=False),
    sa.Column('windows', sa.Integer(), nullable=False),
    sa.Column('seqlen', sa.Integer(), nullable=False),
    sa.Column('perplexity', sa.Float(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint('(artifact_id IS NULL) <> (model_id IS NULL)', name=op.f('ck_evaluations_one_subject')),
    sa.CheckConstraint('windows > 0 AND seqlen > 0', name=op.f('ck_evaluations_windows_seqlen_positive')),
    sa.ForeignKeyConstraint(['artifact_id'], ['artifacts.id'], name=op.f('fk_evaluations_artifact_id_artifacts'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_evaluations_model_id_models'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_evaluations'))
    )
    op.create_index(op.f('ix_evaluations_artifact_id'), 'evaluations', ['artifact_id'], unique=False)
    op.create_index(op.f('ix_evaluations_model_id'), 'evaluations', ['model_id'], unique=False)



def downgrade() -> None:
    op.drop_index(op.f('ix_evaluations_model_id'), table_name='evaluations')
    op.drop_index(op.f('ix_evaluations_artifact_id'), table_name='evaluations')
    op.drop_table('evaluations')
    op.drop_table('layer_results')
    op.drop_index(op.f('ix_artifacts_published_at'), table_name='artifacts')
    op.drop_index(op.f('ix_artifacts_job_id'), table_name='artifacts')
    op.drop_table('artifacts')
    op.drop_index(op.f('ix_jobs_status_created_at'), table_name='jobs')
    op.drop_index(op.f('ix_jobs_prefect_run_id'), table_name='jobs')
    op.drop_index(op.f('ix_jobs_model_id'), table_name='jobs')
    op.drop_index(op.f('ix_jobs_created_at'), table_name='jobs')
    op.drop_index(op.f('ix_jobs_calibration_set_id'), table_name='jobs')
    op.drop_table('jobs')
    op.drop_index(op.f('ix_models_sha256'), table_name='models')
    op.drop_table('models')
    op.drop_index(op.f('ix_calibration_sets_token_hash'), table_name='calibration_sets')
    op.drop_table('calibration_sets')
