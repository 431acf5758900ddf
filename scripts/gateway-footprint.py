#!/usr/bin/env python3
"""Measures millrace-agent's footprint: start-up time to systemd READY, resident
memory idle, and resident memory under an MQTT load from `millrace-sim load`.

    scripts/gateway-footprint.py AGENT_BINARY SIM_BINARY [--series 1000] [--rate 10000]
                                 [--idle 10] [--load 60] [--emulator qemu-aarch64-static]

The agent runs with a scratch config (embedded broker on a free loopback port,
the `load/+/batch` subscription of config/agent.toml, default windows and
scores, no uplink: records stay in the outbox on disk) and with NOTIFY_SOCKET
pointing at a datagram socket this script reads, as under systemd Type=notify.
Start-up time is from exec to the READY=1 datagram. RSS is VmRSS from
/proc/PID/status, sampled every 0.5 s; "peak" is VmHWM. Under --emulator the
process measured is the emulator, so its RSS includes the emulator's own code
and translation cache: an upper bound for the agent, not the agent alone.
Prints one JSON object.
"""
import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status_kib(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


def sample_rss(proc, seconds):
    """RSS samples (KiB) every 0.5 s for `seconds`; fails if the agent exits."""
    samples = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the agent exited with {proc.returncode} during the measurement")
        samples.append(status_kib(proc.pid, "VmRSS"))
        time.sleep(0.5)
    return samples


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("agent")
    ap.add_argument("sim")
    ap.add_argument("--series", type=int, default=1000)
    ap.add_argument("--devices", type=int, default=10)
    ap.add_argument("--rate", type=float, default=10000.0, help="readings per second")
    ap.add_argument("--idle", type=float, default=10.0, help="idle seconds measured")
    ap.add_argument("--load", type=float, default=60.0, help="load seconds")
    ap.add_argument("--emulator", default="")
    args = ap.parse_args()

    scratch = tempfile.mkdtemp(prefix="millrace-footprint.")
    port = free_port()
    config = os.path.join(scratch, "agent.toml")
    with open(config, "w") as f:
        f.write(f"""
[agent]
id = "gw-footprint"
data-dir = "{scratch}/state"

[broker]
enabled = true
listen = "127.0.0.1:{port}"

[[broker.subscriptions]]
filter = "load/+/batch"
qos = 1
format = "json-batch"
device = "{{1}}"
sensor-field = "series"
""")
    notify_path = os.path.join(scratch, "notify.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notify.settimeout(60)

    cmd = ([args.emulator] if args.emulator else []) + [args.agent, "run", "--config", config]
    env = dict(os.environ, NOTIFY_SOCKET=notify_path, RUST_LOG="warn")
    log = open(os.path.join(scratch, "agent.log"), "w")
    started = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log)
    try:
        while True:
            msg = notify.recv(4096).decode()
            if "READY=1" in msg.split("\n"):
                ready_ms = (time.monotonic() - started) * 1000
                break
        idle = sample_rss(proc, args.idle)
        load = subprocess.Popen(
            [args.sim, "load", "--broker", f"127.0.0.1:{port}", "--series", str(args.series),
             "--devices", str(args.devices), "--rate", str(args.rate),
             "--duration", f"{args.load}s", "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        under_load = []
        while load.poll() is None:
            under_load += sample_rss(proc, 0.5)
        report = json.loads(load.stdout.read() or "{}")
        peak = status_kib(proc.pid, "VmHWM")
        proc.terminate()
        stop_started = time.monotonic()
        code = proc.wait(timeout=60)
        stop_ms = (time.monotonic() - stop_started) * 1000
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
        shutil.rmtree(scratch, ignore_errors=True)

    mib = lambda kib: round(kib / 1024, 1)
    print(json.dumps({
        "agent": args.agent,
        "emulator": args.emulator or None,
        "ready_ms": round(ready_ms),
        "idle_rss_mib": mib(max(idle)),
        "load": {"series": args.series, "rate": args.rate, "seconds": args.load,
                 "sim_report": report},
        "load_rss_mib_median": mib(sorted(under_load)[len(under_load) // 2]),
        "load_rss_mib_max": mib(max(under_load)),
        "peak_rss_mib": mib(peak),
        "stop_ms": round(stop_ms),
        "exit_code": code,
    }, indent=1))


if __name__ == "__main__":
    main()
