"""The storm's shape in-process: the gateway's CPU per reading for many devices with short
backlogs (each device: its online state, a hello announcing the backlog, then its messages in a
row, as tools/bench_storm.py's replayers send them) against few devices sending side by side (the
steady phase's shape); the same message encoding, no MQTT, no broker, no load generator on the
CPU. Figures, not a test.

    python tools/bench_storm_inproc.py storm --devices 10000 --backlog 720
    python tools/bench_storm_inproc.py steady --devices 100 --backlog 14400

`sequence` runs phases one after another in one gateway and one database, each phase with
devices of its own, queued once the phase before is committed: how the cost per reading moves
as the gateway's state and its database grow (tools/bench_storm.py's steady / storm / steady):

    python tools/bench_storm_inproc.py sequence steady storm steady
    python tools/bench_storm_inproc.py sequence steady steady steady steady
    python tools/bench_storm_inproc.py sequence steady:100x14400 storm:1000x720
"""
import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from gateway.service import Gateway  # noqa: E402
from shared import wire  # noqa: E402
from tools.bench_compare import MemIngest  # noqa: E402
from tools.bench_storm import NOW, _loadavg, encode_batch  # noqa: E402

T = wire.Topics("edgeflow")


def config(d, max_devices=20000):
    """tools/bench_storm.py's gateway (tools/fleet.Site) without MQTT; max_devices: at least the
    devices of every phase in one gateway (more are quarantined as too_many_devices)."""
    return {"mqtt": {"port": 1883, "queue_size": 1000},
            "store": {"path": os.path.join(d, "gw.db"), "synchronous": "FULL"},
            "watermark": {"out_of_orderness_ms": 5000, "idle_timeout_ms": 60000},
            "windows": {"size_ms": 60000, "allowed_lateness_ms": 60000}, "metrics": {"port": 0},
            "web": {"port": 0}, "security": {"insecure": True}, "dedup": {"max_boots": 4},
            "log": {"level": "warning"}, "limits": {"max_devices": max_devices}}


def workload(shape, devices, backlog, per_msg=50, prefix=None):
    now = int(time.time() * 1000)
    prefix = prefix or ("s" if shape == "storm" else "l")
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
                dev = "%s%05d" % (prefix, i)
                out.append((T.data(dev), encode_batch(dev, i, t_base, s0, min(per_msg, backlog - s0))))
    else:  # round robin, as the steady phase's devices send side by side
        for s0 in range(0, backlog, per_msg):
            for i in range(devices):
                dev = "%s%05d" % (prefix, i)
                out.append((T.data(dev), encode_batch(dev, i, t_base, s0, min(per_msg, backlog - s0))))
    return out


def _thread_cpu(prefix):
    """CPU seconds of the live threads whose name starts with prefix (the store's SQLite thread)."""
    return sum(time.clock_gettime(time.pthread_getcpuclockid(t.ident)) for t in threading.enumerate()
               if t.name.startswith(prefix) and t.ident is not None)


def _written():
    """Bytes this process has written (/proc/self/io wchar): the WAL and the checkpoints into
    the database file."""
    try:
        with open("/proc/self/io") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("wchar:"))
    except (OSError, StopIteration):
        return 0


def _probe(gw):
    s = gw.stats
    return (time.process_time(), time.clock_gettime(time.CLOCK_THREAD_CPUTIME_ID), _thread_cpu("edgeflow-sqlite"),
            _written(), time.perf_counter(), s.checkpoints, s.checkpoint_seconds)


async def _run_phases(cfg, phases):
    """phases: [(name, msgs, readings)], each queued once every message before it is committed.
    Returns [(name, readings, deltas of _probe)]."""
    ingest = []

    def factory(c, s):
        ingest.append(MemIngest([], c, s))
        return ingest[0]

    gw = Gateway(cfg, ingest_factory=factory)
    task = asyncio.ensure_future(gw.run())
    while not ingest or not ingest[0].connected.is_set():
        await asyncio.sleep(0.005)
        if task.done():
            task.result()
    ing = ingest[0]
    out = []
    try:
        for name, msgs, n in phases:
            a = _probe(gw)
            ing.add(msgs)
            while ing.acked < ing.mids:  # committed (the service pubacks a message once its checkpoint is)
                await asyncio.sleep(0.002)
                if task.done():
                    task.result()
            out.append((name, n, [y - x for x, y in zip(a, _probe(gw))]))
            if gw.stats.quarantined:  # a refused message is cheap: the phase's figures would be wrong
                raise SystemExit("phase %s: the gateway quarantined messages %s" % (name, gw.stats.quarantined))
    finally:
        gw.stop()
        await task
    return out


def _phase(spec, k):
    """'storm' / 'steady' / 'storm:DxB' (phase k of the sequence) -> (shape, devices, backlog,
    device id prefix of its own)."""
    shape, _, size = spec.partition(":")
    if shape not in ("storm", "steady"):
        raise SystemExit("phase %r: storm or steady, optionally :DEVICESxBACKLOG" % spec)
    devices, backlog = (10000, 720) if shape == "storm" else (100, 14400)
    if size:
        try:
            devices, backlog = (int(x) for x in size.split("x"))
        except ValueError:
            devices = 0
        if not (1 <= devices <= 99999 and backlog >= 1):  # ids are prefix + 5 digits
            raise SystemExit("phase %r: the size is DEVICESxBACKLOG, 1-99999 devices, e.g. storm:10000x720" % spec)
    return shape, devices, backlog, "%s%d-" % ("s" if shape == "storm" else "l", k)


def sequence(specs, directory=None):
    """Runs the phases (specs: storm / steady / storm:DxB ...) and prints a line per phase; the
    database goes in directory if given (kept), else in a temporary one."""
    phases = []
    devices_in_all = 0
    for k, spec in enumerate(specs):
        shape, devices, backlog, prefix = _phase(spec, k)
        devices_in_all += devices
        phases.append(("%d %s %d x %d" % (k + 1, shape, devices, backlog),
                       workload(shape, devices, backlog, prefix=prefix), devices * backlog))
    d = directory or tempfile.mkdtemp(prefix="edgeflow-inproc-")
    try:
        res = asyncio.run(_run_phases(config(d, max(20000, devices_in_all)), phases))
    finally:
        if directory is None:
            shutil.rmtree(d, ignore_errors=True)
    for name, n, (cpu, loop_cpu, sql_cpu, wrote, wall, ckpts, ckpt_s) in res:
        print("phase %s = %d readings: %.2f us of CPU per reading (event loop %.2f, SQLite thread %.2f), "
              "%.0f readings/s, %.0f bytes written per reading, %d checkpoints (%.0f ms mean)"
              % (name, n, 1e6 * cpu / n, 1e6 * loop_cpu / n, 1e6 * sql_cpu / n, n / wall, wrote / n, ckpts,
                 1000 * ckpt_s / max(1, ckpts)), flush=True)
    print("load average %s" % _loadavg())
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shape", choices=("storm", "steady", "sequence"))
    ap.add_argument("phases", nargs="*", help="sequence: its phases in order (storm, steady, storm:DxB, ...)")
    ap.add_argument("--devices", type=int, default=None, help="default: 10000 (storm), 100 (steady)")
    ap.add_argument("--backlog", type=int, default=None, help="readings per device; default: 720 (storm), "
                                                              "14400 (steady)")
    a = ap.parse_args(argv)
    if a.shape == "sequence":
        sequence(a.phases or ["steady", "storm", "steady"])
        return 0
    if a.phases:
        ap.error("phases are for sequence")
    devices = a.devices or (10000 if a.shape == "storm" else 100)
    backlog = a.backlog or (720 if a.shape == "storm" else 14400)
    msgs = workload(a.shape, devices, backlog)
    n = devices * backlog
    d = tempfile.mkdtemp(prefix="edgeflow-inproc-")
    try:
        [(_name, _n, (cpu, loop_cpu, _sql, _wrote, wall, _ck, _ck_s))] = asyncio.run(
            _run_phases(config(d, max(20000, devices)), [(a.shape, msgs, n)]))
    finally:
        shutil.rmtree(d, ignore_errors=True)
    print("%s: %d devices x %d readings = %d: %.2f us of CPU per reading (event loop %.2f), %.0f readings/s, "
          "load average %s" % (a.shape, devices, backlog, n, 1e6 * cpu / n, 1e6 * loop_cpu / n, n / wall,
                               _loadavg()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
