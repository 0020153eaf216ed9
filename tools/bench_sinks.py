"""Sink cost and collector sizing: gateway throughput with the JetStream sink on vs off, in one run;
then how many readings/s one collector takes. Prints figures; it is not a test.

    python tools/bench_sinks.py [--msgs 20000] [--per-msg 50] [--repeat 3] [--nodes 1]

Gateway part: tools/bench_gateway.py's method (own mosquitto, the whole stream preloaded at
QoS 1, drain timed until every reading is in a committed checkpoint), alternating runs
without sinks and with a jetstream sink forwarding records + window revisions (every reading)
to a NATS server (--nodes 3: a 3-node cluster, stream replicas 3). Reported: committed
readings/s (median) for both and their ratio, plus how long the sink then needed until its
outbox was empty. Collector part: the stream filled by the sink runs is drained by one
edgeflow-collector (SQLite, synchronous FULL) in this process: rows/s and messages/s.
"""
import argparse
import asyncio
import os
import shutil
import sqlite3
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from gateway import collector as C  # noqa: E402
from tools.bench_gateway import _run_gateway, gateway_cfg, raw_publish, start_broker, workload  # noqa: E402
from tools.natscluster import NatsCluster  # noqa: E402


def run_gateway(port, tmp, name, msgs, n, sink_urls=None, replicas=1):
    db = os.path.join(tmp, name + ".db")
    cfg = gateway_cfg(port, db, "FULL")
    cfg["mqtt"]["client_id"] = "bench-gw-" + name
    if sink_urls:
        cfg["sinks"] = {"site": name, "sink": [{"name": "central", "type": "jetstream", "servers": sink_urls,
                                                "tables": ["records", "windows"], "replicas": replicas,
                                                "max_stream_bytes": 3 << 30}]}
    asyncio.run(_run_gateway(cfg, register_only=True))
    raw_publish(port, msgs, "pub-" + name)
    time.sleep(0.2)
    info = asyncio.run(_run_gateway(cfg, until_readings=n))
    if sink_urls:  # what the sink had not sent when ingest finished: time to send it after a restart
        info["drain_s"] = asyncio.run(_drain(cfg))
    return info


async def _drain(cfg):
    """Restart the gateway (nothing left to ingest) and time until its sink outbox is empty."""
    from gateway.service import Gateway
    gw = Gateway(cfg)
    task = asyncio.ensure_future(gw.run())
    t0 = time.perf_counter()
    try:
        while not gw.sinks.workers or gw.sinks.workers[0].rows:
            await asyncio.sleep(0.01)
            if task.done():
                task.result()
            if time.perf_counter() - t0 > 600:
                raise RuntimeError("sink outbox did not drain in 600 s")
        return time.perf_counter() - t0
    finally:
        gw.stop()
        await task


async def collector_drain(urls, db, expect_rows):
    coll = C.Collector(C.load_config(None, {"nats.servers": urls, "store.path": db, "nats.batch": 256}))
    t0 = time.perf_counter()
    task = asyncio.ensure_future(coll.run())
    try:
        while coll.rows_new + coll.rows_dup < expect_rows:
            await asyncio.sleep(0.01)
            if task.done():
                task.result()
        return time.perf_counter() - t0, coll.messages, coll.rows_new + coll.rows_dup
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await coll.close()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=100)
    ap.add_argument("--msgs", type=int, default=20000)
    ap.add_argument("--per-msg", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--nodes", type=int, default=1, help="NATS nodes (3: cluster, stream replicas 3)")
    args = ap.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="bench-sinks-")
    broker, port = start_broker(tmp)
    cluster = NatsCluster(os.path.join(tmp, "nats"), args.nodes).start()
    try:
        cluster.wait_ready()
        replicas = min(3, args.nodes)
        print("mosquitto 127.0.0.1:%d; NATS %d node(s), stream replicas %d; %d devices, %d msgs x %d readings, QoS 1,"
              " SQLite FULL; sink tables: records + windows" % (port, args.nodes, replicas, args.devices, args.msgs,
                                                                args.per_msg))
        msgs = workload(args.devices, args.msgs, args.per_msg)
        n = args.msgs * args.per_msg
        off, on = [], []
        for i in range(args.repeat):
            off.append(run_gateway(port, tmp, "off%d" % i, msgs, n))
            on.append(run_gateway(port, tmp, "on%d" % i, msgs, n, cluster.urls, replicas))
        r_off = sorted(r["readings"] / r["seconds"] for r in off)
        r_on = sorted(r["readings"] / r["seconds"] for r in on)
        m_off, m_on = r_off[len(r_off) // 2], r_on[len(r_on) // 2]
        print("gateway, no sink:          median %8.0f readings/s committed (runs: %s)" % (
            m_off, ", ".join("%.0f" % x for x in r_off)))
        print("gateway, JetStream sink:   median %8.0f readings/s committed (runs: %s)" % (
            m_on, ", ".join("%.0f" % x for x in r_on)))
        print("ratio with / without: %.2f" % (m_on / m_off))
        drains = [r["drain_s"] for r in on]
        print("sink outbox left when ingest finished, drained after restart in: %s s" % (
            ", ".join("%.2f" % d for d in drains)))
        # readings and window revisions: what the sink sent, counted in the site databases
        total = 0
        for i in range(args.repeat):
            db = sqlite3.connect(os.path.join(tmp, "on%d.db" % i))
            total += db.execute("SELECT count(*) FROM readings").fetchone()[0]
            total += db.execute("SELECT count(*) FROM window_revisions").fetchone()[0]
            db.close()
        dt, m, rows = asyncio.run(collector_drain(cluster.urls, os.path.join(tmp, "central.db"), total))
        print("collector (SQLite FULL, one process): %d rows in %d messages from %d sites in %.2f s: %.0f rows/s, "
              "%.0f messages/s" % (rows, m, args.repeat, dt, rows / dt, m / dt))
    finally:
        cluster.stop()
        broker.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
