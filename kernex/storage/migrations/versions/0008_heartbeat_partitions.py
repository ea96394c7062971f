"""Heartbeats partitioned by day on PostgreSQL (kernex.storage.partitions); the device list's index.

On both databases: an index on devices (registered_at, id), the device list's order.

The table is rebuilt: the plain one is renamed, a partitioned one created with the same columns
(primary key (device_id, seq, ts): a partition's key must contain ts), today's and the next
days' partitions plus a default one made, the rows copied, the old table dropped. Rows of
earlier days land in the default partition, which retention empties over time.

Revision ID: 0008
Revises: 0007
"""

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from alembic import op

from kernex.storage.partitions import DEFAULT_PARTITION, PREMAKE_DAYS, create_partition_sql
from kernex.storage.types import UTCDateTime

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD = "heartbeats_unpartitioned"
COLUMNS = (
    "device_id, seq, ts, received_at, status, cpu_percent, memory_mb, disk_free_mb, uptime_s, "
    "bundle_id, bundle_version, config_version, agent_version"
)


def _columns() -> list[sa.schema.SchemaItem]:
    return [
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("ts", UTCDateTime(), nullable=False),
        sa.Column("received_at", UTCDateTime(), nullable=False),
        sa.Column("status", sa.String(length=64), nullable=False),
        sa.Column("cpu_percent", sa.Float(), nullable=False),
        sa.Column("memory_mb", sa.Float(), nullable=False),
        sa.Column("disk_free_mb", sa.Float(), nullable=False),
        sa.Column("uptime_s", sa.Float(), nullable=False),
        sa.Column("bundle_id", sa.String(length=128), nullable=True),
        sa.Column("bundle_version", sa.String(length=64), nullable=True),
        sa.Column("config_version", sa.BigInteger(), nullable=True),
        sa.Column("agent_version", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], ondelete="CASCADE"),
    ]


def _rename_old() -> None:
    # The old table's index names (its primary key's too) would collide with the new table's;
    # foreign key names are per table and need not change.
    op.rename_table("heartbeats", OLD)
    op.execute(f"ALTER TABLE {OLD} RENAME CONSTRAINT heartbeats_pkey TO {OLD}_pkey")
    op.execute(f"ALTER INDEX ix_heartbeats_device_ts RENAME TO ix_{OLD}_device_ts")


def upgrade() -> None:
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.create_index("ix_devices_registered_at_id", ["registered_at", "id"], unique=False)
    if op.get_bind().dialect.name != "postgresql":
        return
    _rename_old()
    op.create_table(
        "heartbeats",
        *_columns(),
        sa.PrimaryKeyConstraint("device_id", "seq", "ts", name="heartbeats_pkey"),
        postgresql_partition_by="RANGE (ts)",
    )
    op.create_index("ix_heartbeats_device_ts", "heartbeats", ["device_id", "ts"], unique=False)
    op.execute(f"CREATE TABLE {DEFAULT_PARTITION} PARTITION OF heartbeats DEFAULT")
    today = datetime.now(UTC).date()
    for offset in range(PREMAKE_DAYS + 1):
        op.execute(create_partition_sql(today + timedelta(days=offset)))
    op.execute(f"INSERT INTO heartbeats ({COLUMNS}) SELECT {COLUMNS} FROM {OLD}")  # noqa: S608 - constants
    op.drop_table(OLD)


def downgrade() -> None:
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.drop_index("ix_devices_registered_at_id")
    if op.get_bind().dialect.name != "postgresql":
        return
    _rename_old()
    op.create_table(
        "heartbeats", *_columns(), sa.PrimaryKeyConstraint("device_id", "seq", name="heartbeats_pkey")
    )
    op.create_index("ix_heartbeats_device_ts", "heartbeats", ["device_id", "ts"], unique=False)
    # (device_id, seq) is unique again: keep the first stored of any rows that share it.
    op.execute(
        f"INSERT INTO heartbeats ({COLUMNS}) SELECT {COLUMNS} FROM {OLD} "  # noqa: S608 - constants
        "ORDER BY received_at ON CONFLICT (device_id, seq) DO NOTHING"
    )
    # Dropping the partitioned table drops its partitions.
    op.drop_table(OLD)
