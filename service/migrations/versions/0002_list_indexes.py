"""covering indexes for the device list filters (tag, fleet + mcu)

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 03:40:00
"""

from __future__ import annotations

from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('device_tags', schema=None) as batch_op:
        batch_op.drop_index('ix_device_tags_tag')
        batch_op.create_index('ix_device_tags_tag_device', ['tag', 'device_id'], unique=False)
    with op.batch_alter_table('devices', schema=None) as batch_op:
        batch_op.create_index('ix_devices_fleet_mcu', ['fleet_id', 'mcu'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('devices', schema=None) as batch_op:
        batch_op.drop_index('ix_devices_fleet_mcu')
    with op.batch_alter_table('device_tags', schema=None) as batch_op:
        batch_op.drop_index('ix_device_tags_tag_device')
        batch_op.create_index('ix_device_tags_tag', ['tag'], unique=False)
