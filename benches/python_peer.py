"""The batched Python consumer users compare edgecache with (issue 14).

confluent-kafka + redis-py, every partition of TOPIC assigned from the
beginning, a Redis pipeline flushed every 1,000 records (SET, or DEL for a
tombstone), until every partition reached the high watermark it had at
start. Usage: python_peer.py BROKERS TOPIC REDIS_PORT KEY_PREFIX
"""

import sys

import redis
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

BATCH = 1000


def main() -> None:
    brokers, topic, port, prefix = sys.argv[1:5]
    consumer = Consumer(
        {
            "bootstrap.servers": brokers,
            "group.id": "edgecache-bench-python",
            "enable.auto.commit": False,
        }
    )
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    pending = {}
    for p in partitions:
        _, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
        if high > 0:
            pending[p] = high
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    r = redis.Redis(port=int(port))
    pipe = r.pipeline(transaction=False)
    queued = 0
    prefix = prefix.encode()
    while pending:
        for msg in consumer.consume(BATCH, timeout=1.0):
            if msg.error():
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    continue
                raise RuntimeError(msg.error())
            key = prefix + msg.key()
            value = msg.value()
            if value is None:
                pipe.delete(key)
            else:
                pipe.set(key, value)
            queued += 1
            if queued == BATCH:
                pipe.execute()
                queued = 0
            if pending.get(msg.partition()) == msg.offset() + 1:
                del pending[msg.partition()]
    pipe.execute()
    consumer.close()


if __name__ == "__main__":
    main()
