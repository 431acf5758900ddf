#!/usr/bin/env python3
"""A Modbus server that is not ours: pymodbus 3.x serving a Millrace plant map.

Used by the agent's integration tests (agent/tests/modbus.rs) as an
independent peer. It serves device maps of the example plant with fixed
fixture values (below), over Modbus TCP on 127.0.0.1, Modbus RTU on a serial
device (e.g. one end of a socat pty pair), or RTU frames over TCP (a serial
device server in transparent mode).

    modbus-peer.py tcp --map press-1 [--port 0] [--unit 1]
    modbus-peer.py rtu --map tank-4 --path /tmp/x/b --unit 3 [--baud 19200]
    modbus-peer.py tcp --unit 1:press-1 --unit 2:pump-2 --gateway-absent 7
    modbus-peer.py rtu-over-tcp --unit 3:tank-4 --unit 4:press-1

`--unit ID:MAP` serves a unit with its own map (else `--map`).
`--gateway-absent ID` plays a Modbus TCP gateway with a dead unit behind it:
requests to that unit are answered with exception 0B (gateway target device
failed to respond).

On start it prints one line to stdout:  ready <transport> <where>
(`ready tcp 127.0.0.1 40123`, `ready rtu-over-tcp 127.0.0.1 40124` or
`ready rtu /tmp/x/b`). It then reads commands from stdin, one per line, and
answers `ok <command>` once applied:

    silent                              accept requests, never reply
    exception <fc> <first> <last> <code>
                                        answer exception <code> to function code
                                        <fc> requests touching [first, last]
    slow <ms>                           answer every request <ms> late
    normal                              reply normally again (clears all three)
    connections                         answers `ok connections <n>`: TCP
                                        connections accepted so far

Requests addressed to a unit id that is not served get no reply (an absent
slave on a bus). The peer exits when stdin closes, so it never outlives the
test that started it.

Requires pymodbus >= 3.10 with the SimDevice datastore (pip install
'pymodbus==3.*' pyserial).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import struct
import sys
import threading

try:
    from pymodbus import FramerType
    from pymodbus.constants import ExcCodes
    from pymodbus.server import ModbusSerialServer, ModbusTcpServer
    from pymodbus.simulator import DataType, SimData, SimDevice
except ImportError as exc:  # pragma: no cover - environment check
    sys.exit(
        f"modbus-peer: pymodbus 3.x with SimDevice is required ({exc}); "
        "pip install 'pymodbus==3.*' pyserial"
    )


# --- fixtures ---------------------------------------------------------------
# Word orders per the plant definition: the value's big-endian bytes laid into
# registers (high byte first) as ABCD straight, CDAB words reversed, BADC
# bytes swapped within each word, DCBA all bytes reversed.


def words(fmt: str, value, order: str = "ABCD") -> list[int]:
    raw = bytearray(struct.pack(">" + fmt, value))
    if order == "DCBA":
        raw.reverse()
    elif order == "BADC":
        for i in range(0, len(raw), 2):
            raw[i], raw[i + 1] = raw[i + 1], raw[i]
    elif order == "CDAB":
        pairs = [raw[i : i + 2] for i in range(0, len(raw), 2)]
        raw = bytearray(b"".join(reversed(pairs)))
    elif order != "ABCD":
        raise ValueError(order)
    return [int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2)]


def plant_map(name: str) -> dict[str, dict[int, int | bool]]:
    """Register tables of one plant device: {table: {address: word or bit}}."""
    hr: dict[int, int] = {}
    ir: dict[int, int] = {}
    co: dict[int, bool] = {}
    di: dict[int, bool] = {}

    def put(table: dict, address: int, ws: list[int]) -> None:
        for i, w in enumerate(ws):
            table[address + i] = w

    if name == "press-1":
        put(hr, 0, words("f", 80.5, "ABCD"))  # temperature 80.5 degC
        put(hr, 2, words("f", 6.25, "CDAB"))  # pressure 6.25 bar
        put(hr, 4, words("H", 14503))  # speed 1450.3 rpm (x0.1)
        put(ir, 0, words("h", -37))  # vibration -0.37 mm/s (x0.01)
        co[0] = True  # running
    elif name == "pump-2":
        put(hr, 0, words("d", 42.125, "ABCD"))  # flow 42.125 m3/h
        put(ir, 10, words("i", -300, "BADC"))  # suction -0.3 bar (x0.001)
        put(hr, 20, words("Q", 123_456_789_012, "DCBA"))  # energy Wh
        put(hr, 24, words("Q", 2**60 + 1, "ABCD"))  # odometer: beyond 2^53
    elif name == "tank-4":
        put(hr, 0, words("H", 553))  # level 55.3 % (x0.1)
    else:
        raise SystemExit(f"modbus-peer: unknown map {name!r}")
    return {"hr": hr, "ir": ir, "co": co, "di": di}


TABLE_SIZE = 64  # addresses 0..63 of every table exist; the rest are illegal


async def gateway_no_response(*_args):
    return ExcCodes.GATEWAY_NO_RESPONSE


def device(unit: int, tables: dict, action) -> SimDevice:
    def regs(table: dict[int, int]) -> list[SimData]:
        values = [table.get(a, 0) for a in range(TABLE_SIZE)]
        return [SimData(0, values=values, datatype=DataType.REGISTERS)]

    def bits(table: dict[int, bool]) -> list[SimData]:
        values = [bool(table.get(a, False)) for a in range(TABLE_SIZE)]
        return [SimData(0, values=values, datatype=DataType.BITS)]

    return SimDevice(
        id=unit,
        simdata=(bits(tables["co"]), bits(tables["di"]), regs(tables["hr"]), regs(tables["ir"])),
        action=action,
    )


# --- control ----------------------------------------------------------------


class Control:
    """The behaviour switches driven by stdin commands."""

    def __init__(self, units: set[int], unit_byte: int) -> None:
        self.silent = False
        self.connections = 0
        self.delay_s = 0.0
        self.exception: tuple[int, int, int, int] | None = None
        self.units = units
        # Offset of the unit id in a frame: 6 in an MBAP (TCP) frame, 0 in RTU.
        self.unit_byte = unit_byte

    async def action(self, function_code, _start, address, count, _registers, set_values):
        if set_values is not None:
            return ExcCodes.ILLEGAL_FUNCTION  # a read-only plant
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.exception:
            fc, first, last, code = self.exception
            if function_code == fc and address <= last and address + count - 1 >= first:
                return ExcCodes(code)
        return None

    def trace_packet(self, sending: bool, data: bytes) -> bytes:
        if not sending:
            return data
        if self.silent:
            return b""
        if len(data) > self.unit_byte and data[self.unit_byte] not in self.units:
            return b""  # an absent slave never answers
        return data

    def trace_connect(self, connected: bool) -> None:
        if connected:
            self.connections += 1

    def apply(self, line: str) -> None:
        parts = line.split()
        if parts == ["silent"]:
            self.silent = True
        elif parts == ["normal"]:
            self.silent = False
            self.delay_s = 0.0
            self.exception = None
        elif parts == ["connections"]:
            print(f"ok connections {self.connections}", flush=True)
            return
        elif len(parts) == 2 and parts[0] == "slow":
            self.delay_s = int(parts[1]) / 1000
        elif len(parts) == 5 and parts[0] == "exception":
            fc, first, last, code = (int(p, 0) for p in parts[1:])
            self.exception = (fc, first, last, code)
        else:
            print(f"error unknown command {line!r}", flush=True)
            return
        print(f"ok {line}", flush=True)


def read_stdin(loop: asyncio.AbstractEventLoop, control: Control, done: asyncio.Event) -> None:
    for line in sys.stdin:
        line = line.strip()
        if line:
            loop.call_soon_threadsafe(control.apply, line)
    loop.call_soon_threadsafe(done.set)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("transport", choices=["tcp", "rtu", "rtu-over-tcp"])
    parser.add_argument("--map", help="press-1 | pump-2 | tank-4: map of units without their own")
    parser.add_argument(
        "--unit", action="append", help="served unit id, or ID:MAP (repeatable), default 1"
    )
    parser.add_argument(
        "--gateway-absent",
        type=int,
        action="append",
        default=[],
        help="unit id answered with exception 0B (repeatable)",
    )
    parser.add_argument("--port", type=int, default=0, help="tcp port, 0 = any free port")
    parser.add_argument("--path", help="rtu: serial device")
    parser.add_argument("--baud", type=int, default=19200)
    args = parser.parse_args()

    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    maps: dict[int, str] = {}
    for spec in args.unit or ["1"]:
        unit, _, name = spec.partition(":")
        name = name or args.map
        if not name:
            parser.error(f"unit {unit} has no map: give --map or --unit {unit}:MAP")
        maps[int(unit)] = name
    units = set(maps)
    over_tcp = args.transport != "rtu"
    # Offset of the unit id in a frame: 6 in an MBAP (TCP) frame, 0 in RTU.
    control = Control(units | set(args.gateway_absent), 6 if args.transport == "tcp" else 0)
    devices = [device(u, plant_map(maps[u]), control.action) for u in sorted(units)]
    devices += [device(u, plant_map("tank-4"), gateway_no_response) for u in args.gateway_absent]

    if over_tcp:
        server = ModbusTcpServer(
            devices,
            framer=FramerType.SOCKET if args.transport == "tcp" else FramerType.RTU,
            address=("127.0.0.1", args.port),
            trace_packet=control.trace_packet,
            trace_connect=control.trace_connect,
        )
    else:
        if not args.path:
            parser.error("rtu needs --path")
        server = ModbusSerialServer(
            devices,
            port=args.path,
            baudrate=args.baud,
            bytesize=8,
            parity="N",
            stopbits=1,
            trace_packet=control.trace_packet,
        )
    await server.serve_forever(background=True)
    if over_tcp:
        port = server.transport.sockets[0].getsockname()[1]
        print(f"ready {args.transport} 127.0.0.1 {port}", flush=True)
    else:
        print(f"ready rtu {args.path}", flush=True)

    done = asyncio.Event()
    threading.Thread(
        target=read_stdin, args=(asyncio.get_running_loop(), control, done), daemon=True
    ).start()
    await done.wait()
    await server.shutdown()


if __name__ == "__main__":
    asyncio.run(main())
