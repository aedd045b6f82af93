"""(filter, id) indexes for device lists at 100k devices; token expiry; idempotency keys

Revision ID: 0003_registry_api
Revises: 0002
Create Date: 2026-12-02 09:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003_registry_api'
down_revision = '0002'
branch_labels = None
depends_on = None

# Each list filter combination gets an index ending in id: a page is one index range.
LIST_INDEXES = {
    'ix_devices_fleet_id': ['fleet_id', 'id'],
    'ix_devices_mcu_id': ['mcu', 'id'],
    'ix_devices_state_id': ['state', 'id'],
    'ix_devices_fleet_mcu_id': ['fleet_id', 'mcu', 'id'],
    'ix_devices_fleet_state_id': ['fleet_id', 'state', 'id'],
    'ix_devices_mcu_state_id': ['mcu', 'state', 'id'],
    'ix_devices_fleet_mcu_state_id': ['fleet_id', 'mcu', 'state', 'id'],
}
OLD_INDEXES = {
    'ix_devices_fleet_state': ['fleet_id', 'state'],
    'ix_devices_fleet_mcu': ['fleet_id', 'mcu'],
    'ix_devices_mcu': ['mcu'],
    'ix_devices_state': ['state'],
}


def upgrade() -> None:
    # Plain CREATE/DROP INDEX (no batch mode): SQLite can do these without a table rebuild.
    for name in OLD_INDEXES:
        op.drop_index(name, table_name='devices')
    for name, columns in LIST_INDEXES.items():
        op.create_index(name, 'devices', columns, unique=False)
    op.add_column('api_tokens', sa.Column('expires_at', sa.DateTime(timezone=True),
                                          nullable=True))
    op.create_table(
        'idempotency_keys',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('scope', sa.String(length=32), nullable=False),
        sa.Column('key', sa.String(length=255), nullable=False),
        sa.Column('request_sha256', sa.String(length=64), nullable=False),
        sa.Column('state', sa.Enum('in_progress', 'done', name='idempotency_state',
                                   native_enum=False, create_constraint=True, length=20),
                  nullable=False),
        sa.Column('device_ids', sa.Text(), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('completed_at', sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('scope', 'key', name='uq_idempotency_keys_scope_key'),
    )
    op.create_index('ix_idempotency_keys_created_at', 'idempotency_keys', ['created_at'],
                    unique=False)


def downgrade() -> None:
    op.drop_index('ix_idempotency_keys_created_at', table_name='idempotency_keys')
    op.drop_table('idempotency_keys')
    with op.batch_alter_table('api_tokens', schema=None) as batch_op:
        batch_op.drop_column('expires_at')
    for name in LIST_INDEXES:
        op.drop_index(name, table_name='devices')
    for name, columns in OLD_INDEXES.items():
        op.create_index(name, 'devices', columns, unique=False)
