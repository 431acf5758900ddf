#!/usr/bin/env python3
"""Reads a Kafka topic from the beginning with confluent-kafka (an independent
client, not ours) and prints one JSON line per record: topic, partition,
offset, key, value (parsed JSON when it is JSON) and headers.

    scripts/kafka-read.py --brokers 127.0.0.1:9092 --topic millrace.windows [--idle-timeout 5]
        [--scram-user NAME --scram-password PASSWORD]   # SASL_PLAINTEXT, SCRAM-SHA-512

It reads every partition up to its end as of the start (its high watermark),
then goes on for at most --idle-timeout seconds more, stopping earlier once
nothing new arrived for that long: so it ends even while producers keep writing. The confluent-kafka package comes from the venv at
$MILLRACE_VENV (default $HOME/.cache/millrace-venv), created with
`python3 -m venv` + `pip install confluent-kafka` on first use.
"""
import argparse
import json
import os
import subprocess
import sys
import time
import uuid

VENV = os.environ.get("MILLRACE_VENV", os.path.expanduser("~/.cache/millrace-venv"))


def ensure_venv():
    """Re-executes this script under the venv's python, installing confluent-kafka if needed."""
    python = os.path.join(VENV, "bin", "python")
    if os.path.realpath(sys.prefix) == os.path.realpath(VENV):
        return
    if not os.path.exists(python):
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True, stdout=sys.stderr)
    probe = subprocess.run([python, "-c", "import confluent_kafka"], capture_output=True)
    if probe.returncode != 0:
        subprocess.run([python, "-m", "pip", "install", "--quiet", "confluent-kafka"],
                       check=True, stdout=sys.stderr)
    os.execv(python, [python] + sys.argv)


def text(b):
    return None if b is None else b.decode("utf-8", errors="replace")


def main():
    ensure_venv()
    from confluent_kafka import Consumer, KafkaError, TopicPartition

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--brokers", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--idle-timeout", type=float, default=5.0,
                    help="seconds without new records, after reaching the end, before stopping")
    ap.add_argument("--scram-user")
    ap.add_argument("--scram-password")
    args = ap.parse_args()

    config = {
        "bootstrap.servers": args.brokers,
        "group.id": "millrace-read-" + uuid.uuid4().hex,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "enable.partition.eof": True,
    }
    if args.scram_user:
        config.update({
            "security.protocol": "SASL_PLAINTEXT",
            "sasl.mechanism": "SCRAM-SHA-512",
            "sasl.username": args.scram_user,
            "sasl.password": args.scram_password or "",
        })
    consumer = Consumer(config)
    metadata = consumer.list_topics(args.topic, timeout=10)
    topic_md = metadata.topics.get(args.topic)
    if topic_md is None or topic_md.error is not None:
        print(f"kafka-read: topic {args.topic} not available: {topic_md and topic_md.error}",
              file=sys.stderr)
        return 2
    partitions = sorted(topic_md.partitions)
    # The end of each partition as of now: reading stops once all are reached.
    ends = {}
    for p in partitions:
        _low, high = consumer.get_watermark_offsets(TopicPartition(args.topic, p), timeout=10)
        ends[p] = high
    consumer.assign([TopicPartition(args.topic, p, 0) for p in partitions])
    pending = {p for p in partitions if ends[p] > 0}
    last_activity = time.monotonic()
    reached_ends = time.monotonic() if not pending else None
    while True:
        now = time.monotonic()
        if reached_ends is not None and (now - last_activity > args.idle_timeout
                                         or now - reached_ends > args.idle_timeout):
            break
        if reached_ends is None and now - last_activity > args.idle_timeout + 30:
            print("kafka-read: never reached the end of the topic", file=sys.stderr)
            return 3
        msg = consumer.poll(0.2)
        if msg is None:
            continue
        if msg.error():
            if msg.error().code() == KafkaError._PARTITION_EOF:
                continue
            print(f"kafka-read: {msg.error()}", file=sys.stderr)
            return 4
        last_activity = now
        if msg.partition() in pending and msg.offset() + 1 >= ends[msg.partition()]:
            pending.discard(msg.partition())
            if not pending:
                reached_ends = time.monotonic()
        raw = msg.value()
        try:
            value = json.loads(raw) if raw is not None else None
        except ValueError:
            value = text(raw)
        print(json.dumps({
            "topic": msg.topic(),
            "partition": msg.partition(),
            "offset": msg.offset(),
            "key": text(msg.key()),
            "value": value,
            "headers": {k: text(v) for k, v in (msg.headers() or [])},
        }), flush=True)
    consumer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
