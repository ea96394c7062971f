"""When a rollout transition went out to integrators (rollout_transitions.published_at).

Revision ID: 0009
Revises: 0008
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from kernex.storage.types import UTCDateTime

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("rollout_transitions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("published_at", UTCDateTime(), nullable=True))
        batch_op.create_index("ix_rollout_transitions_published_at", ["published_at"], unique=False)
    # Transitions recorded before this version are old news: integrators are not sent them now.
    op.execute("UPDATE rollout_transitions SET published_at = at")


def downgrade() -> None:
    with op.batch_alter_table("rollout_transitions", schema=None) as batch_op:
        batch_op.drop_index("ix_rollout_transitions_published_at")
        batch_op.drop_column("published_at")
