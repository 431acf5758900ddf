#!/usr/bin/env python3
"""Prints a one-line summary per record of a millrace-agent tap (JSON lines on stdin)."""
import json
import sys
from datetime import datetime, timezone


def hhmmss(ms):
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%H:%M:%S")


def series(s):
    return f"{s['device']}/{s['sensor']}"


for line in sys.stdin:
    try:
        r = json.loads(line)
    except ValueError:
        continue
    kind = r.get("type")
    if kind == "window":
        score = r.get("score")
        z = f"z={score['z']:+6.2f} {score['severity']}" if score else "warming up"
        print(f"window  {series(r['series']):32} {hhmmss(r['start_ms'])} n={r['count']:<4} "
              f"mean={r['mean']:<12.4f} sd={r['stddev']:<9.4f} {r.get('unit', ''):6} {z}")
    elif kind == "alert":
        s = r["score"]
        print(f"ALERT   {series(r['series']):32} {hhmmss(r['time_ms'])} {r['kind']:6} "
              f"value={r['value']:.4f} z={s['z']:+.2f} {s['severity'].upper()}")
    elif kind == "dead-letter":
        print(f"dead    {r['origin']:32} {hhmmss(r['time_ms'])} {r['reason']}: {r['detail']}")
