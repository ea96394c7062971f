"""Every certificate issued to a device (device_certificates), so a revocation covers them all.

Revision ID: 0010
Revises: 0009
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from kernex.storage.types import UTCDateTime

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "device_certificates",
        sa.Column("serial", sa.String(length=64), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("issued_at", UTCDateTime(), nullable=False),
        sa.Column("not_after", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("serial"),
    )
    with op.batch_alter_table("device_certificates", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_device_certificates_device_id"), ["device_id"], unique=False)
    # The certificates known so far: each device's latest (earlier serials were never kept).
    op.execute(
        "INSERT INTO device_certificates (serial, device_id, issued_at, not_after)"
        " SELECT cert_serial, id, updated_at, cert_not_after FROM devices"
        " WHERE cert_serial IS NOT NULL AND cert_not_after IS NOT NULL"
    )


def downgrade() -> None:
    with op.batch_alter_table("device_certificates", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_device_certificates_device_id"))
    op.drop_table("device_certificates")
