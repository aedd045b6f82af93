"""registry: fleets, devices, tags, api tokens

Revision ID: 0001
Revises: (none)
Create Date: 2026-11-22 03:14:15.933032
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def _enum(name: str, *values: str) -> sa.Enum:
    return sa.Enum(*values, name=name, native_enum=False, create_constraint=True, length=20)


def upgrade() -> None:
    op.create_table('api_tokens',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('role', _enum('token_role', 'viewer', 'operator', 'admin'), nullable=False),
    sa.Column('token_hash', sa.String(length=64), nullable=False),
    sa.Column('prefix', sa.String(length=16), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_used_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('token_hash')
    )
    op.create_table('fleets',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('description', sa.Text(), nullable=False),
    sa.Column('signing_public_key', sa.Text(), nullable=False),
    sa.Column('signing_key_path', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name')
    )
    op.create_table('devices',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('fleet_id', sa.Integer(), nullable=False),
    sa.Column('mcu', sa.String(length=32), nullable=False),
    sa.Column('cpu', sa.String(length=20), nullable=False),
    sa.Column('sram_bytes', sa.Integer(), nullable=False),
    sa.Column('flash_bytes', sa.Integer(), nullable=False),
    sa.Column('slot_bytes', sa.Integer(), nullable=False),
    sa.Column('ota_layout', sa.String(length=10), nullable=False),
    sa.Column('state', _enum('device_state', 'active', 'decommissioned'), nullable=False),
    sa.Column('mqtt_password_hash', sa.String(length=160), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('decommissioned_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['fleet_id'], ['fleets.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name')
    )
    with op.batch_alter_table('devices', schema=None) as batch_op:
        batch_op.create_index('ix_devices_fleet_state', ['fleet_id', 'state'], unique=False)
        batch_op.create_index('ix_devices_mcu', ['mcu'], unique=False)
        batch_op.create_index('ix_devices_state', ['state'], unique=False)

    op.create_table('device_tags',
    sa.Column('device_id', sa.String(length=32), nullable=False),
    sa.Column('tag', sa.String(length=64), nullable=False),
    sa.ForeignKeyConstraint(['device_id'], ['devices.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('device_id', 'tag')
    )
    with op.batch_alter_table('device_tags', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_device_tags_tag'), ['tag'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('device_tags', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_device_tags_tag'))

    op.drop_table('device_tags')
    with op.batch_alter_table('devices', schema=None) as batch_op:
        batch_op.drop_index('ix_devices_state')
        batch_op.drop_index('ix_devices_mcu')
        batch_op.drop_index('ix_devices_fleet_state')

    op.drop_table('devices')
    op.drop_table('fleets')
    op.drop_table('api_tokens')
