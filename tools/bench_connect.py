"""mosquitto's connect burst on its own: N clients whose first connects are spread uniformly over
--jitter-s (the firmware's full-jitter reconnect), TCP + CONNECT + CONNACK only, against the
same broker config as tools/bench_storm.py; prints the kernel's ListenOverflows (connects dropped
by mosquitto's fixed listen backlog of 100) and the CONNACK waits. --hogs N runs N busy-looping
processes beside it: the burst under CPU contention, as on a shared 2-core box. Figures, not a test.

    python tools/bench_connect.py --clients 10000 --jitter-s 5
    python tools/bench_connect.py --clients 10000 --jitter-s 5 --hogs 2
"""
import argparse
import asyncio
import multiprocessing
import os
import random
import resource
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from firmware import mqttc as MC  # noqa: E402
from tools.bench_storm import _listen_overflows, _loadavg  # noqa: E402
from tools.broker import Mosquitto  # noqa: E402
from tools.fleet import proc_cpu_s  # noqa: E402


class _Client(asyncio.Protocol):
    def __init__(self):
        self.tr = None
        self.connack = asyncio.get_running_loop().create_future()

    def connection_made(self, tr):
        self.tr = tr

    def data_received(self, data):
        if not self.connack.done():
            self.connack.set_result(True)

    def connection_lost(self, exc):
        if not self.connack.done():
            self.connack.set_result(False)


async def _one(i, port, jitter, waits):
    await asyncio.sleep(random.random() * jitter)
    t0 = time.monotonic()
    c = _Client()
    await asyncio.wait_for(asyncio.get_running_loop().create_connection(lambda: c, "127.0.0.1", port), 60)
    c.tr.write(MC.connect_packet("c%05d" % i, 60, True, None, None, None))
    ok = await asyncio.wait_for(c.connack, 60)
    waits.append(time.monotonic() - t0 if ok else float("inf"))
    return c


async def _burst(port, n, jitter):
    waits = []
    lo0, t0 = _listen_overflows(), time.monotonic()
    clients = await asyncio.gather(*[_one(i, port, jitter, waits) for i in range(n)])
    dt = time.monotonic() - t0
    lo1 = _listen_overflows()
    for c in clients:
        c.tr.abort()
    waits.sort()
    q = lambda f: waits[min(len(waits) - 1, int(f * len(waits)))]  # noqa: E731
    return dt, (lo1 - lo0) if lo0 is not None and lo1 is not None else None, q(.5), q(.9), q(.99), waits[-1], \
        sum(1 for w in waits if w > 1.0)


def _hog(stop_at):
    while time.time() < stop_at:
        pass


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=10000)
    ap.add_argument("--jitter-s", type=float, default=5.0)
    ap.add_argument("--hogs", type=int, default=0, help="busy-looping processes beside the broker and the clients")
    a = ap.parse_args(argv)
    need = a.clients + 200
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
    d = tempfile.mkdtemp(prefix="edgeflow-connect-")
    m = Mosquitto(d, insecure=True)
    m.start()
    hogs = [multiprocessing.Process(target=_hog, args=(time.time() + 3 * a.jitter_s + 60,), daemon=True)
            for _ in range(a.hogs)]
    try:
        print("load average before: %s; %d CPU hog(s)" % (_loadavg(), a.hogs))
        for h in hogs:
            h.start()
        b0, c0 = proc_cpu_s(m.proc.pid), time.process_time()
        dt, lo, p50, p90, p99, mx, over1 = asyncio.run(_burst(m.port, a.clients, a.jitter_s))
        b1, c1 = proc_cpu_s(m.proc.pid), time.process_time()
        print("%d clients, first connects over %.1f s: all connected in %.1f s; connects dropped by a full listen "
              "queue (whole machine) %s; wait for the CONNACK p50 %.3f p90 %.3f p99 %.3f max %.3f s, %d over 1 s" % (
                  a.clients, a.jitter_s, dt, "-" if lo is None else lo, p50, p90, p99, mx, over1))
        print("CPU: broker %.2f s (%.0f us per connect), clients (this process) %.2f s" % (
            b1 - b0, 1e6 * (b1 - b0) / a.clients, c1 - c0))
    finally:
        for h in hogs:
            h.terminate()
            h.join(5)
        m.stop()
        shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
