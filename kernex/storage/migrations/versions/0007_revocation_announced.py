"""When ingest announced a device's revocation on the fleet topics (devices.revocation_announced_at).

Revision ID: 0007
Revises: 0006
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from kernex.storage.types import UTCDateTime

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.add_column(sa.Column("revocation_announced_at", UTCDateTime(), nullable=True))
    # Devices revoked before this version are old news: integrators are not told again.
    op.execute(
        "UPDATE devices SET revocation_announced_at = COALESCE(revoked_at, updated_at)"
        " WHERE state = 'revoked'"
    )


def downgrade() -> None:
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.drop_column("revocation_announced_at")
