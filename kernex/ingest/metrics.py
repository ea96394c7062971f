"""Prometheus metrics of the ingest worker, on a registry of its own.

A dedicated CollectorRegistry (not prometheus_client's global one) lets several workers live in
one process, as they do in tests, without "Duplicated timeseries" errors.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from kernex.protocol.messages import RejectReason
from kernex.protocol.topics import Channel

# Batches range from one message (idle fleet) to batch_max (backlog after an outage).
BATCH_SIZE_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10_000)
# A healthy commit takes milliseconds; seconds mean a struggling database.
COMMIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Lag spans live traffic (sub-second) to heartbeats buffered through an outage (up to max_age_s).
LAG_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0, 86_400.0)


class Outcome:
    """Label values of kernex_ingest_messages_total{outcome}."""

    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    REJECTED = "rejected"


class IngestMetrics:
    """The worker's counters, gauges and histograms."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.messages = Counter(
            "kernex_ingest_messages_total",
            "Device messages handled, by channel and outcome (accepted, duplicate, rejected).",
            ["channel", "outcome"],
            registry=self.registry,
        )
        self.rejected = Counter(
            "kernex_ingest_rejected_total",
            "Device messages refused, by reason; they are acknowledged and never stored.",
            ["reason"],
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "kernex_ingest_batch_size",
            "Messages per committed batch.",
            buckets=BATCH_SIZE_BUCKETS,
            registry=self.registry,
        )
        self.commit_seconds = Histogram(
            "kernex_ingest_commit_seconds",
            "Time to write and commit one batch.",
            buckets=COMMIT_BUCKETS,
            registry=self.registry,
        )
        self.lag_seconds = Histogram(
            "kernex_ingest_lag_seconds",
            "Receive time minus the message's own timestamp, for accepted messages.",
            buckets=LAG_BUCKETS,
            registry=self.registry,
        )
        self.pending_acks = Gauge(
            "kernex_ingest_pending_acks",
            "Messages received but not yet acknowledged (buffered or in a batch being written).",
            registry=self.registry,
        )
        self.db_errors = Counter(
            "kernex_ingest_db_errors_total",
            "Failed batch writes; the batch is retried and stays unacknowledged until it commits.",
            registry=self.registry,
        )
        self.connected = Gauge(
            "kernex_ingest_broker_connected",
            "1 while connected to the broker with the subscriptions in place, else 0.",
            registry=self.registry,
        )
        self.dropped = Counter(
            "kernex_ingest_dropped_total",
            "QoS 0 messages dropped because the buffer was full (QoS 1 is never dropped).",
            registry=self.registry,
        )
        self.fleet_published = Counter(
            "kernex_ingest_fleet_published_total",
            "Verified messages queued for republication on the integrators' fleet topics.",
            registry=self.registry,
        )
        self.fleet_dropped = Counter(
            "kernex_ingest_fleet_dropped_total",
            "Fleet messages dropped because the publish queue was full (ingest is never slowed).",
            registry=self.registry,
        )
        # Loss detection: each device's seq grows by one per message, so a jump in the stored
        # last_seq is a message not (yet) stored. Counted over the fleet, not per device (label
        # cardinality); gaps minus late is the number still missing (kernex.storage.writer).
        self.seq_gaps = Counter(
            "kernex_ingest_seq_gaps_total",
            "Heartbeat seqs skipped when a device's latest seq advanced (lost, or arriving late).",
            registry=self.registry,
        )
        self.seq_late = Counter(
            "kernex_ingest_seq_late_total",
            "Heartbeats stored below their device's latest seq: late arrivals filling a counted gap.",
            registry=self.registry,
        )
        # Pre-create every label combination so dashboards see zeros instead of gaps.
        for reason in RejectReason:
            self.rejected.labels(reason=reason.value)
        for channel in (Channel.HEARTBEAT, Channel.EVENTS, Channel.STATUS):
            for outcome in (Outcome.ACCEPTED, Outcome.DUPLICATE, Outcome.REJECTED):
                self.messages.labels(channel=channel.value, outcome=outcome)

    def count(self, channel: str, outcome: str, n: int = 1) -> None:
        """Add n messages of one channel and outcome."""
        if n:
            self.messages.labels(channel=channel, outcome=outcome).inc(n)

    def reject(self, channel: str, reason: RejectReason) -> None:
        """Count one rejected message."""
        self.messages.labels(channel=channel, outcome=Outcome.REJECTED).inc()
        self.rejected.labels(reason=reason.value).inc()
