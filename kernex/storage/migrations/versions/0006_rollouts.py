"""Device groups, rollouts (phased deployments) and their transitions; a target's rollout phase.

Revision ID: 0006
Revises: 0005
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from kernex.storage.types import JSONType, UTCDateTime

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "device_groups",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("filter", JSONType, nullable=True),
        sa.Column("description", sa.String(length=512), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("created_by", sa.String(length=128), nullable=True),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "device_group_members",
        sa.Column("group_id", sa.String(length=64), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("added_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["group_id"], ["device_groups.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("group_id", "device_id"),
    )
    with op.batch_alter_table("device_group_members", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_device_group_members_device_id"), ["device_id"], unique=False)

    op.create_table(
        "rollout_transitions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("deployment_id", sa.String(length=64), nullable=False),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.Column("event", sa.String(length=32), nullable=False),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("phase", sa.Integer(), nullable=True),
        sa.Column("actor", sa.String(length=128), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("details", JSONType, nullable=False),
        sa.ForeignKeyConstraint(["deployment_id"], ["deployments.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("rollout_transitions", schema=None) as batch_op:
        batch_op.create_index("ix_rollout_transitions_deployment_at", ["deployment_id", "at"], unique=False)

    op.create_table(
        "rollouts",
        sa.Column("deployment_id", sa.String(length=64), nullable=False),
        sa.Column("strategy", JSONType, nullable=False),
        sa.Column("selector", JSONType, nullable=False),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("phase", sa.Integer(), nullable=False),
        sa.Column("phase_started_at", UTCDateTime(), nullable=True),
        sa.Column("phase_passed_at", UTCDateTime(), nullable=True),
        sa.Column("stop_reason", sa.Text(), nullable=True),
        sa.Column("stopped_at", UTCDateTime(), nullable=True),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["deployment_id"], ["deployments.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("deployment_id"),
    )
    with op.batch_alter_table("rollouts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_rollouts_state"), ["state"], unique=False)

    with op.batch_alter_table("deployment_targets", schema=None) as batch_op:
        batch_op.add_column(sa.Column("phase", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("reverted_by", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("deployment_targets", schema=None) as batch_op:
        batch_op.drop_column("reverted_by")
        batch_op.drop_column("phase")

    with op.batch_alter_table("rollouts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_rollouts_state"))

    op.drop_table("rollouts")
    with op.batch_alter_table("rollout_transitions", schema=None) as batch_op:
        batch_op.drop_index("ix_rollout_transitions_deployment_at")

    op.drop_table("rollout_transitions")
    with op.batch_alter_table("device_group_members", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_device_group_members_device_id"))

    op.drop_table("device_group_members")
    op.drop_table("device_groups")
