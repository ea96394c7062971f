"""Deployments, commands and configuration: signed commands with per-device revisions, fleet defaults.

Revision ID: 0003
Revises: 0002
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from kernex.storage.types import JSONType, UTCDateTime

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("command_revision", sa.BigInteger(), server_default="0", nullable=False)
        )
        batch_op.add_column(sa.Column("heartbeat_interval_s", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("config_applied_version", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("config_applied_seq", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("config_applied_at", UTCDateTime(), nullable=True))
        batch_op.add_column(sa.Column("config_error", sa.Text(), nullable=True))

    with op.batch_alter_table("deployments", schema=None) as batch_op:
        batch_op.add_column(sa.Column("cancelled_at", UTCDateTime(), nullable=True))
        batch_op.add_column(sa.Column("cancelled_by", sa.String(length=128), nullable=True))

    with op.batch_alter_table("deployment_targets", schema=None) as batch_op:
        batch_op.add_column(sa.Column("command_id", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("last_seq", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("finished_at", UTCDateTime(), nullable=True))
        batch_op.create_index(batch_op.f("ix_deployment_targets_status"), ["status"], unique=False)

    with op.batch_alter_table("device_configs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("overrides", JSONType, server_default="{}", nullable=False))
        batch_op.add_column(sa.Column("defaults_version", sa.BigInteger(), nullable=True))

    op.create_table(
        "fleet_configs",
        sa.Column("version", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("values", JSONType, nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("created_by", sa.String(length=128), nullable=True),
        sa.PrimaryKeyConstraint("version"),
    )
    op.create_table(
        "device_commands",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("revision", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("token", sa.Text(), nullable=False),
        sa.Column("deployment_id", sa.String(length=64), nullable=True),
        sa.Column("config_version", sa.BigInteger(), nullable=True),
        sa.Column("issued_at", UTCDateTime(), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=False),
        sa.Column("published_at", UTCDateTime(), nullable=True),
        sa.Column("cleared_at", UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(["deployment_id"], ["deployments.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("device_commands", schema=None) as batch_op:
        batch_op.create_index(
            "ix_device_commands_device_kind", ["device_id", "kind", "revision"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_device_commands_state"), ["state"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("device_commands", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_device_commands_state"))
        batch_op.drop_index("ix_device_commands_device_kind")
    op.drop_table("device_commands")
    op.drop_table("fleet_configs")

    with op.batch_alter_table("device_configs", schema=None) as batch_op:
        batch_op.drop_column("defaults_version")
        batch_op.drop_column("overrides")

    with op.batch_alter_table("deployment_targets", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_deployment_targets_status"))
        batch_op.drop_column("finished_at")
        batch_op.drop_column("last_seq")
        batch_op.drop_column("command_id")

    with op.batch_alter_table("deployments", schema=None) as batch_op:
        batch_op.drop_column("cancelled_by")
        batch_op.drop_column("cancelled_at")

    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.drop_column("config_error")
        batch_op.drop_column("config_applied_at")
        batch_op.drop_column("config_applied_seq")
        batch_op.drop_column("config_applied_version")
        batch_op.drop_column("heartbeat_interval_s")
        batch_op.drop_column("command_revision")
