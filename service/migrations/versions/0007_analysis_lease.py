"""model_versions: the contribution analysis's lease (owner, lease_until) and attempts, so an
analysis whose worker died is taken over or failed with its reason, never left running

Revision ID: 0007_analysis_lease
Revises: 0006_personalize_round
Create Date: 2026-12-02 15:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0007_analysis_lease'
down_revision = '0006_personalize_round'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('model_versions') as batch:
        batch.add_column(sa.Column('analysis_owner', sa.String(length=64), nullable=True))
        batch.add_column(sa.Column('analysis_lease_until', sa.DateTime(timezone=True),
                                   nullable=True))
        batch.add_column(sa.Column('analysis_attempts', sa.Integer(), nullable=False,
                                   server_default='0'))


def downgrade() -> None:
    with op.batch_alter_table('model_versions') as batch:
        batch.drop_column('analysis_attempts')
        batch.drop_column('analysis_lease_until')
        batch.drop_column('analysis_owner')
