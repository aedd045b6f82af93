"""devices.personalize_round: round numbers handed out atomically

Revision ID: 0006_personalize_round
Revises: 0005_device_metrics
Create Date: 2026-12-02 16:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0006_personalize_round'
down_revision = '0005_device_metrics'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('devices', schema=None) as batch_op:
        batch_op.add_column(sa.Column('personalize_round', sa.Integer(), server_default='0',
                                      nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('devices', schema=None) as batch_op:
        batch_op.drop_column('personalize_round')
