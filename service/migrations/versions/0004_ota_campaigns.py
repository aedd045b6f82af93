"""OTA campaigns: model versions, campaigns, deployment jobs and events, per-class plans,
builds and signed artifacts; the device row's installed version, artifact, slot, update state

Revision ID: 0004_ota_campaigns
Revises: 0003_registry_api
Create Date: 2026-12-02 11:23:25.372685
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004_ota_campaigns'
down_revision = '0003_registry_api'
branch_labels = None
depends_on = None


MODEL_KIND = ('family', 'onnx')
ANALYSIS_STATE = ('none', 'queued', 'running', 'done', 'failed')
CAMPAIGN_STATE = ('scheduled', 'running', 'paused', 'halted', 'aborted', 'waiting-offline',
    'completed', 'closed', 'rolled-back')
WORK_STATE = ('running', 'done', 'failed')
JOB_STATE = ('pending', 'queued', 'planning', 'building', 'offering', 'waiting-offline', 'offered',
    'accepted', 'downloading', 'installing', 'installed', 'failed', 'skipped', 'aborted',
    'rollback-sent', 'rolled-back', 'closed')


def _enum(name: str, values: tuple[str, ...]) -> sa.Enum:
    return sa.Enum(*values, name=name, native_enum=False, create_constraint=True,
                   length=20)


def upgrade() -> None:
    op.create_table('model_versions',
    sa.Column('id', sa.String(length=16), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('kind', _enum('model_kind', MODEL_KIND), nullable=False),
    sa.Column('path', sa.Text(), nullable=False),
    sa.Column('size_bytes', sa.Integer(), nullable=False),
    sa.Column('analysis_state', _enum('analysis_state', ANALYSIS_STATE), nullable=False),
    sa.Column('analysis_reason', sa.Text(), nullable=True),
    sa.Column('info', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('campaigns',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('model_version_id', sa.String(length=16), nullable=False),
    sa.Column('state', _enum('campaign_state', CAMPAIGN_STATE), nullable=False),
    sa.Column('selector', sa.Text(), nullable=False),
    sa.Column('canary_percent', sa.Float(), nullable=False),
    sa.Column('batch_size', sa.Integer(), nullable=False),
    sa.Column('max_failure_percent', sa.Float(), nullable=False),
    sa.Column('personalize', sa.Boolean(), nullable=False),
    sa.Column('offer_deadline_s', sa.Integer(), nullable=False),
    sa.Column('install_deadline_s', sa.Integer(), nullable=False),
    sa.Column('start_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('batch_count', sa.Integer(), nullable=False),
    sa.Column('current_batch', sa.Integer(), nullable=False),
    sa.Column('halt_reason', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['model_version_id'], ['model_versions.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('campaigns', schema=None) as batch_op:
        batch_op.create_index('ix_campaigns_state', ['state'], unique=False)

    op.create_table('class_builds',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('model_version_id', sa.String(length=16), nullable=False),
    sa.Column('hw_class', sa.String(length=96), nullable=False),
    sa.Column('state', _enum('work_state', WORK_STATE), nullable=False),
    sa.Column('payload_sha256', sa.String(length=64), nullable=True),
    sa.Column('manifest', sa.Text(), nullable=True),
    sa.Column('emulated', sa.Boolean(), nullable=True),
    sa.Column('report', sa.Text(), nullable=True),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('lease_until', sa.DateTime(timezone=True), nullable=True),
    sa.Column('owner', sa.String(length=64), nullable=True),
    sa.Column('from_cache', sa.Boolean(), nullable=False),
    sa.Column('seconds', sa.Float(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['model_version_id'], ['model_versions.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('model_version_id', 'hw_class', name='uq_class_builds_version_class')
    )
    op.create_table('class_plans',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('model_version_id', sa.String(length=16), nullable=False),
    sa.Column('hw_class', sa.String(length=96), nullable=False),
    sa.Column('state', _enum('work_state', WORK_STATE), nullable=False),
    sa.Column('result', sa.Text(), nullable=True),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('lease_until', sa.DateTime(timezone=True), nullable=True),
    sa.Column('owner', sa.String(length=64), nullable=True),
    sa.Column('from_cache', sa.Boolean(), nullable=False),
    sa.Column('seconds', sa.Float(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['model_version_id'], ['model_versions.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('model_version_id', 'hw_class', name='uq_class_plans_version_class')
    )
    op.create_table('deployment_jobs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('campaign_id', sa.Integer(), nullable=False),
    sa.Column('device_id', sa.String(length=32), nullable=False),
    sa.Column('fleet_id', sa.Integer(), nullable=False),
    sa.Column('batch', sa.Integer(), nullable=False),
    sa.Column('hw_class', sa.String(length=96), nullable=False),
    sa.Column('hw', sa.Text(), nullable=False),
    sa.Column('state', _enum('job_state', JOB_STATE), nullable=False),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('emulated', sa.Boolean(), nullable=True),
    sa.Column('artifact_sha256', sa.String(length=64), nullable=True),
    sa.Column('update_id', sa.String(length=32), nullable=True),
    sa.Column('progress', sa.Float(), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('state_changed_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('offered_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['campaign_id'], ['campaigns.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['device_id'], ['devices.id'], ),
    sa.ForeignKeyConstraint(['fleet_id'], ['fleets.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('campaign_id', 'device_id', name='uq_jobs_campaign_device'),
    sa.UniqueConstraint('update_id')
    )
    with op.batch_alter_table('deployment_jobs', schema=None) as batch_op:
        batch_op.create_index('ix_jobs_campaign_state', ['campaign_id', 'state'], unique=False)
        batch_op.create_index('ix_jobs_device_state', ['device_id', 'state'], unique=False)
        batch_op.create_index('ix_jobs_state_changed', ['state', 'state_changed_at'], unique=False)

    op.create_table('signed_artifacts',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('build_id', sa.Integer(), nullable=False),
    sa.Column('fleet_id', sa.Integer(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('size_bytes', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['build_id'], ['class_builds.id'], ),
    sa.ForeignKeyConstraint(['fleet_id'], ['fleets.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('build_id', 'fleet_id', name='uq_signed_artifacts_build_fleet')
    )
    op.create_table('job_events',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=False),
    sa.Column('state', sa.String(length=20), nullable=False),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('source', sa.String(length=16), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['deployment_jobs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('job_events', schema=None) as batch_op:
        batch_op.create_index('ix_job_events_job', ['job_id', 'id'], unique=False)

    with op.batch_alter_table('devices', schema=None) as batch_op:
        batch_op.add_column(sa.Column('installed_model_version', sa.String(length=16),
                                      nullable=True))
        batch_op.add_column(sa.Column('installed_artifact', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('installed_slot', sa.String(length=8), nullable=True))
        batch_op.add_column(sa.Column('update_state', sa.String(length=20), nullable=True))
        batch_op.add_column(sa.Column('online', sa.Boolean(), nullable=False,
                                      server_default=sa.false()))
        batch_op.add_column(sa.Column('last_seen_at', sa.DateTime(timezone=True), nullable=True))



def downgrade() -> None:
    with op.batch_alter_table('devices', schema=None) as batch_op:
        batch_op.drop_column('last_seen_at')
        batch_op.drop_column('online')
        batch_op.drop_column('update_state')
        batch_op.drop_column('installed_slot')
        batch_op.drop_column('installed_artifact')
        batch_op.drop_column('installed_model_version')

    with op.batch_alter_table('job_events', schema=None) as batch_op:
        batch_op.drop_index('ix_job_events_job')

    op.drop_table('job_events')
    op.drop_table('signed_artifacts')
    with op.batch_alter_table('deployment_jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_state_changed')
        batch_op.drop_index('ix_jobs_device_state')
        batch_op.drop_index('ix_jobs_campaign_state')

    op.drop_table('deployment_jobs')
    op.drop_table('class_plans')
    op.drop_table('class_builds')
    with op.batch_alter_table('campaigns', schema=None) as batch_op:
        batch_op.drop_index('ix_campaigns_state')

    op.drop_table('campaigns')
    op.drop_table('model_versions')
