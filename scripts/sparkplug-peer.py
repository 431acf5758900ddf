#!/usr/bin/env python3
"""A Sparkplug B edge node that is not ours: pysparkplug, publishing through an
MQTT broker (mosquitto in the tests).

    sparkplug-peer.py --port 1883 --group plant-a --node edge-1 --device plc-1

It connects with an NDEATH will (bdSeq), prints `ready`, and then reads
commands from stdin, one per line, answering `ok <command>` once published:

    birth                         NBIRTH (metrics with names, aliases and types)
                                  then DBIRTH of the device
    ndata <alias> <value> [<ms>]  NDATA of one node metric, by alias only
    ddata <alias> <value> [<ms>]  DDATA of one device metric, by alias only
    text                          NDATA of the node's string metric (alias 4)
    skip                          use up one sequence number (a gap follows)
    ndeath                        NDEATH with the current bdSeq
    raw <TYPE> <hex>              publish raw bytes on spBv1.0/<group>/<TYPE>/<node>

Every NCMD the broker delivers to the node is printed as `ncmd <name>=<value>`
per metric (a host's rebirth request is `ncmd Node Control/Rebirth=True`).
The peer exits when stdin closes.

Node metrics (alias: name, type): 1 Inputs/Temperature double, 2 Inputs/Count
int32, 3 Status/Running boolean, 4 Status/Mode string, 5 Counters/Energy
uint64. Device metrics: 10 Pressure float, 11 Level int16.

Requires pysparkplug (pip install pysparkplug).
"""

from __future__ import annotations

import argparse
import sys
import threading

try:
    import pysparkplug as spb
except ImportError as exc:  # pragma: no cover - environment check
    sys.exit(f"sparkplug-peer: pysparkplug is required ({exc}); pip install pysparkplug")

DT = spb.DataType

# Lines come from two threads (commands, and paho's for NCMDs): one write
# per line, under a lock, so they never interleave.
_OUT = threading.Lock()


def say(line: str) -> None:
    with _OUT:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

NODE_METRICS = {
    1: ("Inputs/Temperature", DT.DOUBLE, 21.5),
    2: ("Inputs/Count", DT.INT32, -3),
    3: ("Status/Running", DT.BOOLEAN, True),
    4: ("Status/Mode", DT.STRING, "auto"),
    5: ("Counters/Energy", DT.UINT64, 1234),
}
DEVICE_METRICS = {
    10: ("Pressure", DT.FLOAT, 6.25),
    11: ("Level", DT.INT16, -7),
}


def parse_value(datatype, text: str):
    if datatype in (DT.DOUBLE, DT.FLOAT):
        return float(text)
    if datatype == DT.BOOLEAN:
        return text.lower() in ("1", "true")
    if datatype == DT.STRING:
        return text
    return int(text)


class Node:
    def __init__(self, args: argparse.Namespace) -> None:
        self.group = args.group
        self.node = args.node
        self.device = args.device
        self.seq = 0
        self.bd_seq = 0
        self.lock = threading.Lock()
        self.client = spb.Client(client_id=f"spb-{args.node}")
        self.client.set_will(self.death_message())
        self.client.subscribe(
            spb.Topic(
                message_type=spb.MessageType.NCMD, group_id=self.group, edge_node_id=self.node
            ),
            spb.QoS.AT_LEAST_ONCE,
            self.on_cmd,
        )
        connected = threading.Event()
        self.client.connect(
            "127.0.0.1", port=args.port, blocking=False, callback=lambda _c: connected.set()
        )
        if not connected.wait(10):
            sys.exit("sparkplug-peer: no CONNACK within 10 s")

    def next_seq(self) -> int:
        seq = self.seq
        self.seq = (self.seq + 1) % 256
        return seq

    def topic(self, kind, device: bool = False) -> spb.Topic:
        return spb.Topic(
            message_type=kind,
            group_id=self.group,
            edge_node_id=self.node,
            device_id=self.device if device else None,
        )

    def death_message(self) -> spb.Message:
        bd = spb.Metric(timestamp=spb.get_current_timestamp(), name="bdSeq", datatype=DT.INT64, value=self.bd_seq)
        return spb.Message(
            topic=self.topic(spb.MessageType.NDEATH),
            payload=spb.NDeath(timestamp=spb.get_current_timestamp(), bd_seq_metric=bd),
            qos=spb.QoS.AT_MOST_ONCE,
            retain=False,
        )

    def publish(self, kind, payload, device: bool = False) -> None:
        self.client.publish(
            spb.Message(topic=self.topic(kind, device), payload=payload, qos=spb.QoS.AT_MOST_ONCE, retain=False),
            include_dtypes=True,
        )

    def birth(self) -> None:
        now = spb.get_current_timestamp()
        self.seq = 0
        metrics = [
            spb.Metric(timestamp=now, name=name, datatype=dt, value=value, alias=alias)
            for alias, (name, dt, value) in NODE_METRICS.items()
        ]
        metrics.append(spb.Metric(timestamp=now, name="bdSeq", datatype=DT.INT64, value=self.bd_seq))
        metrics.append(spb.Metric(timestamp=now, name="Node Control/Rebirth", datatype=DT.BOOLEAN, value=False))
        self.publish(spb.MessageType.NBIRTH, spb.NBirth(timestamp=now, seq=self.next_seq(), metrics=tuple(metrics)))
        if self.device:
            dmetrics = tuple(
                spb.Metric(timestamp=now, name=name, datatype=dt, value=value, alias=alias)
                for alias, (name, dt, value) in DEVICE_METRICS.items()
            )
            self.publish(spb.MessageType.DBIRTH, spb.DBirth(timestamp=now, seq=self.next_seq(), metrics=dmetrics), device=True)

    def data(self, device: bool, alias: int, value: str, ts: int | None) -> None:
        table = DEVICE_METRICS if device else NODE_METRICS
        _name, dt, _ = table[alias]
        now = spb.get_current_timestamp()
        metric = spb.Metric(timestamp=ts if ts is not None else now, name=None, datatype=dt, value=parse_value(dt, value), alias=alias)
        if device:
            self.publish(spb.MessageType.DDATA, spb.DData(timestamp=now, seq=self.next_seq(), metrics=(metric,)), device=True)
        else:
            self.publish(spb.MessageType.NDATA, spb.NData(timestamp=now, seq=self.next_seq(), metrics=(metric,)))

    def on_cmd(self, _client, message: spb.Message) -> None:
        for metric in message.payload.metrics:
            say(f"ncmd {metric.name}={metric.value}")

    def apply(self, line: str) -> None:
        parts = line.split()
        with self.lock:
            if parts == ["birth"]:
                self.birth()
            elif parts[0] in ("ndata", "ddata") and len(parts) in (3, 4):
                ts = int(parts[3]) if len(parts) == 4 else None
                self.data(parts[0] == "ddata", int(parts[1]), parts[2], ts)
            elif parts == ["text"]:
                self.data(False, 4, "manual", None)
            elif parts == ["skip"]:
                self.next_seq()
            elif parts == ["ndeath"]:
                self.client.publish(self.death_message())
            elif parts[0] == "raw" and len(parts) == 3:
                self.client._client.publish(f"spBv1.0/{self.group}/{parts[1]}/{self.node}", bytes.fromhex(parts[2]), qos=0).wait_for_publish()
            else:
                say(f"error unknown command {line!r}")
                return
        say(f"ok {line}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--node", required=True)
    parser.add_argument("--device")
    node = Node(parser.parse_args())
    say("ready")
    for line in sys.stdin:
        line = line.strip()
        if line:
            node.apply(line)


if __name__ == "__main__":
    main()
