"""device_metrics: personalization rounds' metrics per device and round

Revision ID: 0005_device_metrics
Revises: 0004_ota_campaigns
Create Date: 2026-12-02 12:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0005_device_metrics'
down_revision = '0004_ota_campaigns'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'device_metrics',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('device_id', sa.String(length=32), nullable=False),
        sa.Column('round', sa.Integer(), nullable=False),
        sa.Column('model_version', sa.String(length=128), nullable=True),
        sa.Column('samples_used', sa.Integer(), nullable=False),
        sa.Column('accuracy_before', sa.Float(), nullable=False),
        sa.Column('accuracy_after', sa.Float(), nullable=False),
        sa.Column('loss_before', sa.Float(), nullable=False),
        sa.Column('loss_after', sa.Float(), nullable=False),
        sa.Column('loss_curve', sa.Text(), nullable=False),
        sa.Column('training_memory_bytes', sa.Integer(), nullable=False),
        sa.Column('duration_s', sa.Float(), nullable=False),
        sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['device_id'], ['devices.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('device_id', 'round', name='uq_device_metrics_device_round'),
    )


def downgrade() -> None:
    op.drop_table('device_metrics')
