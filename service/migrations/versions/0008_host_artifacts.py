"""host artifacts: a class build's host shared library (target, payload, manifest, or the
reason it failed), its signed image per fleet, and the backend a device's presence names

Revision ID: 0008_host_artifacts
Revises: 0007_analysis_lease
Create Date: 2026-12-02 16:50:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0008_host_artifacts'
down_revision = '0007_analysis_lease'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('devices') as batch:
        batch.add_column(sa.Column('backend', sa.String(length=40), nullable=True))
    with op.batch_alter_table('class_builds') as batch:
        batch.add_column(sa.Column('host_target', sa.String(length=40), nullable=True))
        batch.add_column(sa.Column('host_payload_sha256', sa.String(length=64), nullable=True))
        batch.add_column(sa.Column('host_manifest', sa.Text(), nullable=True))
        batch.add_column(sa.Column('host_reason', sa.Text(), nullable=True))
    with op.batch_alter_table('signed_artifacts') as batch:
        batch.add_column(sa.Column('host_sha256', sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('signed_artifacts') as batch:
        batch.drop_column('host_sha256')
    with op.batch_alter_table('class_builds') as batch:
        batch.drop_column('host_reason')
        batch.drop_column('host_manifest')
        batch.drop_column('host_payload_sha256')
        batch.drop_column('host_target')
    with op.batch_alter_table('devices') as batch:
        batch.drop_column('backend')
