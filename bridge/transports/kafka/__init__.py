"""Kafka through confluent-kafka (librdkafka); the only module that imports it.

Producing: an idempotent producer (acks=all); a publish returns when its delivery report
arrives. A daemon thread serves delivery reports so a publish never waits on the consumer loop.

Consuming: records are fetched without blocking the event loop (`consume(timeout=0)` with a
short back-off when idle) so rebalance callbacks run on the loop's thread and need no locks.
A partition's committable offset is one past its lowest record not yet settled
(`OffsetTracker`). Every offset is committed by the `Committer` in a Kafka transaction, together
with what the records below it published (retries, delay hops, dead letters), every 50 ms, on
revoke (synchronously) and on close; on a lost partition nothing is committed. Consumers read
`read_committed`. When every slot is busy the assigned partitions are paused and polling goes
on, so a long job never pushes the consumer past `max.poll.interval.ms`; nothing polls during a
stop's grace period, so that interval is the grace period and a minute (at least 300 s).

Delays: `<prefix>.delay.<tier>` topics; `_DelayForwarder`, inside every `bridge consume`, moves
due records to their queues (see its docstring).

Per-key ordering (later) fits between fetch and `InFlight.start`: records of one key wait in a
lane while an earlier one of the same key runs; offsets need no change.
"""

from bridge.transports.kafka.transport import KafkaTransport

__all__ = ["KafkaTransport"]
