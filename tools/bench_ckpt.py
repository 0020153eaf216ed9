"""Benchmark of the replicated checkpoint (gateway/ckpt.py) on a real NATS JetStream cluster.

    python -m tools.bench_ckpt                          # 3 nodes R3, ~2 min on 2 cores
    python -m tools.bench_ckpt --sizes 20000,100000 --nodes 1

1. Cost per commit: the same reading batches (random values and times, 50 readings per
   message, 200 devices) through one gateway pipeline in-process with the plain Store and
   with the ReplicatedStore (each commit's delta appended to JetStream before its acks):
   committed readings/s of both in one run, delta bytes per commit and per reading
   (zlib-compressed msgpack; the uncompressed size too).
2. Takeover cost vs partition state size: for each size, a partition with that many
   readings; rebuild time of a fresh file from the deltas alone, and from a snapshot
   (object store) + the deltas after it.
"""
import argparse
import asyncio
import os
import random
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import nats  # noqa: E402

from gateway import ckpt  # noqa: E402
from gateway.service import Gateway  # noqa: E402
from shared import wire  # noqa: E402
from tools.bench_compare import MemIngest  # noqa: E402  (the service's ingest over a list)
from tools.natscluster import NatsCluster  # noqa: E402

T0 = int(time.time() * 1000) - 24 * 3600 * 1000


def workload(devices, n_msgs, per_msg, seed=1):
    """Reading batches with noisy values and jittered times (compress like field data, not
    like a counter)."""
    rng = random.Random(seed)
    topics = wire.Topics("edgeflow")
    out, seqs, ts, vals = [], [0] * devices, [T0] * devices, [20000] * devices
    for i in range(n_msgs):
        d = i % devices
        dev = "dev%04d" % d
        rs = []
        for j in range(per_msg):
            ts[d] += rng.randrange(900, 1100)
            vals[d] += rng.randrange(-150, 151)
            rs.append((seqs[d] + j, ts[d], j % 4, 0, vals[d]))
        seqs[d] += per_msg
        out.append((topics.data(dev), wire.encode_readings(dev, 1, rs)))
    return out


def cfg(db):
    return {"store": {"path": db, "synchronous": "FULL"}, "metrics": {"port": 0}, "security": {"insecure": True},
            "checkpoint": {"interval_ms": 100, "max_messages": 400, "max_records": 50000},
            "mqtt": {"queue_size": 1000},
            "windows": {"size_ms": 10000, "groups": [{"name": "all0", "devices": ["*"], "channel": 0}]}}


async def drain(msgs, db, store=None, snapshot_at_end=False):
    """Run one pipeline over msgs; returns (seconds until every message is acked, gateway)."""
    gw = Gateway(cfg(db), ingest_factory=lambda c, s: MemIngest(msgs, c, s), store=store)
    task = asyncio.ensure_future(gw.run())
    while gw.ingest is None or not gw.ingest.connected.is_set():
        await asyncio.sleep(0.005)
        if task.done():
            task.result()
    t0 = time.perf_counter()
    while gw.ingest.acked < len(msgs):
        await asyncio.sleep(0.005)
        if task.done():
            task.result()
    dt = time.perf_counter() - t0
    if snapshot_at_end:
        rep = store.rep
        await rep.start_snapshot(store.db, store.path, "%s-%d" % (rep.token, rep.n))
    gw.stop()
    await task
    return dt, gw


async def run(args, urls, tmp):
    nc = await nats.connect(urls)
    js = nc.jetstream(timeout=10)
    st = ckpt.Settings(replicas=args.nodes, snapshot_min_bytes=1 << 40)  # snapshots only when asked
    obs = await ckpt.ensure(js, st)
    sizes = [int(x) for x in args.sizes.split(",")]
    per = 50
    msgs = workload(200, max(max(sizes) // per, args.cost_messages), per)
    print("workload: %d messages x %d readings, 200 devices; NATS %d node(s), replicas %d; %d cores"
          % (len(msgs), per, args.nodes, args.nodes, os.cpu_count()))
    # 1. cost per commit, plain vs replicated, alternating runs
    n_cost = min(len(msgs), args.cost_messages)
    rates = {"plain": [], "replicated": []}
    reps = []
    for r in range(args.repeat):
        for mode in ("plain", "replicated"):
            db = os.path.join(tmp, "cost-%s-%d.db" % (mode, r))
            store = None
            if mode == "replicated":
                rep, _ = await ckpt.prepare(js, obs, st, 900 + r, db, "bench")
                store = ckpt.ReplicatedStore(db, "FULL", rep)
                reps.append(rep)
            dt, gw = await drain(msgs[:n_cost], db, store)
            rates[mode].append(n_cost * per / dt)
            print("  run %d %-10s %8.0f readings/s committed (%.2f s, %d commits)"
                  % (r, mode, n_cost * per / dt, dt, gw.stats.checkpoints))
    med = {k: sorted(v)[len(v) // 2] for k, v in rates.items()}
    print("committed readings/s, median: plain %.0f, replicated %.0f; replicated / plain %.2f"
          % (med["plain"], med["replicated"], med["replicated"] / med["plain"]))
    rep = reps[-1]
    print("checkpoint deltas: %d, %.0f bytes per delta, %.2f bytes per reading committed (zlib msgpack); "
          "publish retries %d" % (rep.published, rep.bytes / rep.published, rep.bytes / (n_cost * per), rep.retries))
    # 2. rebuild time vs size
    print("%-10s %-12s %-34s %-34s" % ("readings", "file bytes", "rebuild from deltas (s, deltas, bytes)",
                                         "from snapshot + tail (s, snapshot bytes)"))
    for i, n in enumerate(sizes):
        p = 100 + i
        db = os.path.join(tmp, "size-%d.db" % n)
        rep, _ = await ckpt.prepare(js, obs, st, p, db, "bench")
        store = ckpt.ReplicatedStore(db, "FULL", rep)
        sizes_zr = []  # (compressed, uncompressed) of each delta (not a timed run)
        publish = rep.publish

        async def measured(cid, writes, publish=publish, out=sizes_zr):
            out.append((len(ckpt.encode(writes)), len(ckpt.encode(writes, compress=False))))
            return await publish(cid, writes)
        rep.publish = measured
        await drain(msgs[:n // per], db, store)
        z, r = sum(x for x, _ in sizes_zr), sum(y for _, y in sizes_zr)
        print("  %d readings: deltas %d, %d bytes compressed, %d uncompressed (%.2f), %.1f / %.1f bytes per reading"
              % (n, len(sizes_zr), z, r, z / max(1, r), z / n, r / n))
        a, _ = await ckpt.rebuild(js, obs, st, p, os.path.join(tmp, "rb-a-%d.db" % n))
        # the same state again, now with a snapshot at the end: rebuild = snapshot + tail
        p2 = 200 + i
        db2 = os.path.join(tmp, "size2-%d.db" % n)
        rep2, _ = await ckpt.prepare(js, obs, st, p2, db2, "bench")
        store2 = ckpt.ReplicatedStore(db2, "FULL", rep2)
        await drain(msgs[:n // per], db2, store2, snapshot_at_end=True)
        b, _ = await ckpt.rebuild(js, obs, st, p2, os.path.join(tmp, "rb-b-%d.db" % n))
        print("%-10d %-12d %6.2f s, %5d, %10d              %6.2f s, %d (+%d deltas)"
              % (n, a.db_bytes, a.seconds, a.deltas, a.delta_bytes, b.seconds, b.snapshot_bytes, b.deltas))
    await nc.close()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="20000,100000,500000", help="partition sizes in readings")
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--cost-messages", type=int, default=4000, help="messages of 50 readings for the cost runs")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="bench-ckpt-")
    c = NatsCluster(os.path.join(tmp, "nats"), args.nodes).start()
    try:
        c.wait_ready(60)
        asyncio.run(run(args, c.urls, tmp))
    finally:
        c.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
