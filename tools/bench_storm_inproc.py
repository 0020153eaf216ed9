"""The storm's shape in-process: the gateway's CPU per reading for many devices with short
backlogs (each device: its online state, a hello announcing the backlog, then its messages in a
row, as tools/bench_storm.py's replayers send them) against few devices sending side by side (the
steady phase's shape); the same message encoding, no MQTT, no broker, no load generator on the
CPU. Figures, not a test.

    python tools/bench_storm_inproc.py storm --devices 10000 --backlog 720
    python tools/bench_storm_inproc.py steady --devices 100 --backlog 14400
"""
import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from gateway.service import Gateway  # noqa: E402
from shared import wire  # noqa: E402
from tools.bench_compare import MemIngest  # noqa: E402
from tools.bench_storm import NOW, _loadavg, encode_batch  # noqa: E402

T = wire.Topics("edgeflow")


def config(d):
    """tools/bench_storm.py's gateway (tools/fleet.Site) without MQTT."""
    return {"mqtt": {"port": 1883, "queue_size": 1000},
            "store": {"path": os.path.join(d, "gw.db"), "synchronous": "FULL"},
            "watermark": {"out_of_orderness_ms": 5000, "idle_timeout_ms": 60000},
            "windows": {"size_ms": 60000, "allowed_lateness_ms": 60000}, "metrics": {"port": 0},
            "web": {"port": 0}, "security": {"insecure": True}, "dedup": {"max_boots": 4},
            "log": {"level": "warning"}, "limits": {"max_devices": 20000}}


def workload(shape, devices, backlog, per_msg=50):
    now = int(time.time() * 1000)
    prefix = "s" if shape == "storm" else "l"
    out = []
    for i in range(devices):
        dev = "%s%05d" % (prefix, i)
        n = backlog if shape == "storm" else 0  # steady: live data, nothing announced
        out.append((T.state(dev), wire.encode_state(True)))
        out.append((T.hello(dev), wire.encode_hello(dev, 1, n, now, n, 1, 0, i + 1, 1, "inproc")))
    t_base = NOW - backlog * 1000
    if shape == "storm":  # one device after the other, its messages in a row
        for i in range(devices):
            for s0 in range(0, backlog, per_msg):
                out.append((T.data("s%05d" % i), encode_batch("s%05d" % i, i, t_base, s0, min(per_msg, backlog - s0))))
    else:  # round robin, as the steady phase's devices send side by side
        for s0 in range(0, backlog, per_msg):
            for i in range(devices):
                out.append((T.data("l%05d" % i), encode_batch("l%05d" % i, i, t_base, s0, min(per_msg, backlog - s0))))
    return out


async def _run(cfg, msgs, n):
    gw = Gateway(cfg, ingest_factory=lambda c, s: MemIngest(msgs, c, s))
    task = asyncio.ensure_future(gw.run())
    while gw.ingest is None or not gw.ingest.connected.is_set():
        await asyncio.sleep(0.005)
        if task.done():
            task.result()
    p0, m0, w0 = time.process_time(), time.clock_gettime(time.CLOCK_THREAD_CPUTIME_ID), time.perf_counter()
    while gw.stats.readings < n or not (gw._commit_task is None or gw._commit_task.done()):
        await asyncio.sleep(0.002)
        if task.done():
            task.result()
    p1, m1, w1 = time.process_time(), time.clock_gettime(time.CLOCK_THREAD_CPUTIME_ID), time.perf_counter()
    gw.stop()
    await task
    return p1 - p0, m1 - m0, w1 - w0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shape", choices=("storm", "steady"))
    ap.add_argument("--devices", type=int, default=None, help="default: 10000 (storm), 100 (steady)")
    ap.add_argument("--backlog", type=int, default=None, help="readings per device; default: 720 (storm), "
                                                              "14400 (steady)")
    a = ap.parse_args(argv)
    devices = a.devices or (10000 if a.shape == "storm" else 100)
    backlog = a.backlog or (720 if a.shape == "storm" else 14400)
    msgs = workload(a.shape, devices, backlog)
    n = devices * backlog
    d = tempfile.mkdtemp(prefix="edgeflow-inproc-")
    try:
        cpu, loop_cpu, wall = asyncio.run(_run(config(d), msgs, n))
    finally:
        shutil.rmtree(d, ignore_errors=True)
    print("%s: %d devices x %d readings = %d: %.2f us of CPU per reading (event loop %.2f), %.0f readings/s, "
          "load average %s" % (a.shape, devices, backlog, n, 1e6 * cpu / n, 1e6 * loop_cpu / n, n / wall,
                               _loadavg()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
