"""Republishing committed, verified messages on the integrators' fleet topics.

When: after the batch committed and before its device messages are acknowledged. paho writes
both, in that order, onto the one connection, so the broker has taken the fleet messages before
it sees the acknowledgements: a crash before then leaves the device messages unacknowledged,
the broker redelivers them, and they are republished (at least once; integrators deduplicate,
see kernex.protocol.fleet). Nothing waits for the broker: paho's publish only queues, so a
slow broker or a slow integrator never holds up a batch. The queue is capped
(FLEET_MAX_QUEUED); beyond it fleet messages are dropped and counted, never ingest slowed.

What: the writer's normalized batch (kernex.storage.fleet): heartbeats and events of devices
that still existed at commit, and the status changes it recorded. Revocations are announced
apart, by kernex.ingest.revocations, through `queue`. Duplicates of rows stored
by an earlier batch are republished (a redelivered message may be the copy whose first
republication was lost), with their own received_at; a copy repeated within one batch is
republished once.
"""

from __future__ import annotations

from collections.abc import Iterator

from paho.mqtt.client import Client
from paho.mqtt.enums import MQTTErrorCode

from kernex.ingest.metrics import IngestMetrics
from kernex.kit.logs import get_logger
from kernex.protocol.fleet import FLEET_QOS, FleetMessage, encode, fleet_topic
from kernex.protocol.topics import Topics
from kernex.storage.fleet import channel_of
from kernex.storage.writer import WriteResult

log = get_logger(__name__)

# Fleet messages paho may hold for the broker (in flight or queued while disconnected): two
# batches' worth at the default batch size and more, a few MiB of memory at most.
FLEET_MAX_QUEUED = 10_000


def fleet_messages(topics: Topics, result: WriteResult) -> Iterator[tuple[str, FleetMessage]]:
    """The (topic, message) pairs one committed batch republishes, in batch order."""
    for message in result.fleet:
        yield fleet_topic(topics, message.device_id, channel_of(message)), message


def queue(client: Client, topic: str, payload: bytes, qos: int = FLEET_QOS) -> bool:
    """Queue one fleet message on paho; False when its queue is full (the message is dropped)."""
    info = client.publish(topic, payload, qos=qos)
    # NO_CONN: paho keeps a QoS 1 message and sends it once reconnected.
    return info.rc in {MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN}


class FleetRepublisher:
    """Queues a committed batch's fleet messages on ingest's MQTT client."""

    def __init__(self, topics: Topics, metrics: IngestMetrics) -> None:
        self._topics = topics
        self._metrics = metrics

    def publish(self, client: Client, result: WriteResult) -> None:
        """Queue every fleet message of the batch; never blocks, never raises for the broker."""
        published = dropped = 0
        for topic, message in fleet_messages(self._topics, result):
            if queue(client, topic, encode(message)):
                published += 1
            else:
                dropped += 1
        if published:
            self._metrics.fleet_published.inc(published)
        if dropped:
            self._metrics.fleet_dropped.inc(dropped)
            log.warning("fleet messages dropped: the publish queue is full", dropped=dropped)
