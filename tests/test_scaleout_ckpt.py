"""Replicated checkpoint (issue 15 item 3, gateways on separate disks): exact delta encoding,
rebuild from JetStream (snapshot + tail) equal to the owner's file, the fence against a
stale owner, and no ack for a commit JetStream did not take. Real NATS (secured node)."""
import asyncio
import collections
import math
import os
import random
import sqlite3
import struct
import time

import pytest

from gateway import ckpt
from gateway.config import Config
from gateway.ingest_jetstream import Security
from gateway.service import Gateway
from gateway.store import Store, StoreError
from tests.test_scaleout import _fleet_messages, _on_secure_node, _until

SECTIONS = {"windows": {"size_ms": 5000, "allowed_lateness_ms": 20000,
                        "groups": [{"name": "all", "devices": ["*"], "channel": 0}]},
            "watermark": {"out_of_orderness_ms": 2000, "idle_timeout_ms": 3600000}}
# every table a commit writes (the views and channels are made from the config at open)
TABLES = ("readings", "reading_spans", "unsynced", "device_windows", "cep_events", "anomalies", "device_status",
          "gaps", "window_results", "window_revisions", "late", "quarantine", "devices", "dedup", "dedup_devices",
          "device_identity", "device_watermarks", "open_windows", "meta", "sink_outbox")


def _same(a, b):
    """Exact equality, floats bit for bit (NaN too), types included."""
    if isinstance(a, float) or isinstance(b, float):
        return type(a) is type(b) and struct.pack("<d", a) == struct.pack("<d", b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def test_delta_encoding_is_exact_and_rejects_garbage():
    rows = [("dev-1", 0, None, b"\x00\xffbits", 1.5, float("nan"), float("inf"), -0.0, 5e-324, True, False,
             2 ** 63 - 1, -2 ** 63, 2 ** 64 - 1, "sümsq ✓", "")]
    big = [(2 ** 70, -2 ** 65 - 3, "x")]
    writes = [("readings_flat", ["dev-1", 1, 2, 3, 0, 0, -7] * 3), ("window_results", rows), ("empty", []),
              ("open_windows", big), ("meta", [("global_watermark", 123)])]
    for compress in (True, False):
        back = ckpt.decode(ckpt.encode(writes, compress))
        want = [(k, r) for k, r in writes if r]
        assert [k for k, _ in back] == [k for k, _ in want]
        for (_k, r1), (_k2, r2) in zip(back, want):
            assert _same(r1, r2), (r1, r2)
    # bounded, clear failures on garbage (never a crash or an unbounded allocation)
    for bad in (b"", b"\x07abc", b"\x02not zlib", b"\x01\xc1", ckpt.encode(writes)[:-3]):
        with pytest.raises(Exception) as ei:
            ckpt.decode(bad)
        assert not isinstance(ei.value, (MemoryError, SystemError))


class FeedIngest:
    """The service's ingest interface; messages pushed by the test; acked mids recorded."""

    def __init__(self, cfg, stats):
        self.queue = collections.deque()
        self.maxsize = 100000
        self.wake = asyncio.Event()
        self.connected = asyncio.Event()
        self.paused = self.closing = False
        self.acked = []
        self.published = 0
        self.n = 0

    def push(self, msgs):
        now = time.monotonic()
        for t, p in msgs:
            self.queue.append((t.encode(), p, self.n, 1, now))
            self.n += 1
        self.wake.set()

    async def start(self):
        self.connected.set()

    async def stop(self, offline=True):
        pass

    def pause(self):
        self.paused = True

    def resume(self):
        self.paused = False

    def maybe_resume(self):
        pass

    def puback(self, mids):
        self.acked.extend(m for m, _q in mids)

    def publish(self, topic, payload, qos=1, retain=False):
        self.published += 1


def _cfg(db):
    return Config(dict(SECTIONS, store={"path": db, "synchronous": "NORMAL"}, metrics={"port": 0},
                       security={"insecure": True}, checkpoint={"interval_ms": 20}))


async def _connect(c, gw):
    import nats
    nc = await nats.connect(c.urls, **Security(Config(dict(gw, metrics={"port": 0}))).nats_options())
    return nc, nc.jetstream(timeout=5)


class Pipe:
    """One partition pipeline with a replicated store, run by the test."""

    def __init__(self, js, obs, st, p, path, gid):
        self.js, self.obs, self.st, self.p, self.path, self.gid = js, obs, st, p, path, gid

    async def start(self):
        self.rep, self.info = await ckpt.prepare(self.js, self.obs, self.st, self.p, self.path, self.gid)
        self.gw = Gateway(_cfg(self.path), ingest_factory=FeedIngest,
                          store=ckpt.ReplicatedStore(self.path, "NORMAL", self.rep))
        self.task = asyncio.ensure_future(self.gw.run())
        await _until(lambda: self.gw.started.is_set() or self.task.done(), 20)
        self.ing = self.gw.ingest
        return self

    async def feed(self, msgs, timeout=30):
        want = self.ing.n + len(msgs)
        self.ing.push(msgs)
        await _until(lambda: len(self.ing.acked) >= want or self.task.done(), timeout)

    async def stop(self):
        self.gw.stop()
        return await asyncio.gather(self.task, return_exceptions=True)


def _dump(path):
    c = sqlite3.connect(path)
    try:
        return {t: sorted(c.execute("SELECT * FROM %s" % t).fetchall(), key=repr) for t in TABLES}
    finally:
        c.close()


def _msgs(first_dev, n_dev=6, per_dev=160):
    """The messages of devices first_dev.. first_dev + n_dev - 1 (hello, then readings)."""
    from shared import wire
    out = _fleet_messages(first_dev + n_dev, per_dev, random.Random(first_dev), 5000, 1500)
    mine = {"dev-%04d" % i for i in range(first_dev, first_dev + n_dev)}
    return [m for m in out if wire.Topics("edgeflow").parse(m[0])[0] in mine]


def test_rebuild_from_snapshot_and_tail_equals_the_owners_file_and_the_stream_stays_bounded(tmp_path):
    """Commits replicated with a small snapshot threshold: snapshots are taken and the
    deltas before them purged (the subject keeps few messages); a fresh rebuild from the
    latest snapshot + the tail equals the owner's file table by table; the owner's own
    file is trusted on a retake (equal to the stream), and a retake by another gateway
    rebuilds and carries on."""
    async def go(c, gw):
        nc, js = await _connect(c, gw)
        try:
            st = ckpt.Settings(replicas=1, snapshot_min_bytes=6000, snapshot_ratio=0.0, max_chunk=8192)
            obs = await ckpt.ensure(js, st)
            a = await Pipe(js, obs, st, 0, str(tmp_path / "a" / "part-000.db"), "a").start()
            assert not a.info.trusted
            msgs = _msgs(0, per_dev=400)
            for i in range(0, len(msgs), 8):  # a commit per few messages: many deltas
                await a.feed(msgs[i:i + 8])
            assert len(a.ing.acked) == len(msgs)
            await _until(lambda: a.rep.snapshots >= 2 and a.rep._snap_task.done(), 30)
            st.snapshot_min_bytes = 1 << 30  # no more snapshots: a tail of deltas after the last one
            await a.feed(_msgs(6, per_dev=20))
            rep = a.rep
            assert rep.published > 10 and rep.snapshot_failures == 0
            si = await js.stream_info(ckpt.STREAM, subjects_filter=ckpt.delta_subject("edgeflow", 0))
            on_subject = si.state.subjects[ckpt.delta_subject("edgeflow", 0)]
            assert on_subject < rep.published, (on_subject, rep.published)  # purged behind the snapshots
            # a rebuild from JetStream alone, while the owner runs
            info, last_id = await ckpt.rebuild(js, obs, st, 0, str(tmp_path / "r" / "part-000.db"))
            assert info.snapshot_bytes > 0 and info.deltas >= 1
            assert _dump(str(tmp_path / "r" / "part-000.db")) == _dump(a.path)
            assert (await a.stop())[0] is None
            # the owner's file equals the stream: trusted on a retake, no rebuild
            a2 = await Pipe(js, obs, st, 0, a.path, "a").start()
            assert a2.info.trusted
            assert (await a2.stop())[0] is None
            # another gateway (its own empty directory) rebuilds and carries on exactly
            b = await Pipe(js, obs, st, 0, str(tmp_path / "b" / "part-000.db"), "b").start()
            assert not b.info.trusted and b.info.snapshot_bytes > 0
            more = _msgs(12, per_dev=40)
            await b.feed(more + msgs[:50])  # old messages again: duplicates, counted once
            assert b.gw.stats.duplicates > 0
            assert (await b.stop())[0] is None
            c2 = sqlite3.connect(b.path)
            n = c2.execute("SELECT count(*), count(DISTINCT device || '/' || boot || '/' || seq) FROM readings")
            total, distinct = n.fetchone()
            c2.close()
            assert total == distinct == 6 * 400 + 6 * 20 + 6 * 40
        finally:
            await nc.close()

    _on_secure_node(tmp_path, 1, go)
