"""Replicated checkpoint (issue 15 item 3, gateways on separate disks): exact delta encoding,
rebuild from JetStream (snapshot + tail) equal to the owner's file, the fence against a
stale owner, and no ack for a commit JetStream did not take. Real NATS (secured node)."""
import asyncio
import random
import sqlite3
import struct
import time

import pytest

from gateway import ckpt
from gateway.config import Config
from gateway.ingest_jetstream import Security
from gateway.service import Gateway
from gateway.store import StoreError
from tests.test_scaleout import _fleet_messages, _on_secure_node, _until
from tools.bench_compare import MemIngest

SECTIONS = {"windows": {"size_ms": 5000, "allowed_lateness_ms": 20000,
                        "groups": [{"name": "all", "devices": ["*"], "channel": 0}]},
            "watermark": {"out_of_orderness_ms": 2000, "idle_timeout_ms": 3600000}}


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


class FeedIngest(MemIngest):
    """The service's ingest interface; messages pushed by the test; acked mids and the
    device acks sent recorded."""

    def __init__(self, cfg, stats):
        super().__init__([], cfg, stats)
        self.maxsize = 100000
        self.acked = []
        self.sent = []  # (topic, payload) of the device acks
        self.n = 0

    def push(self, msgs):
        now = time.monotonic()
        for t, p in msgs:
            self.queue.append((t.encode(), p, self.n, 1, now))
            self.n += 1
        self.wake.set()

    def puback(self, mids):
        self.acked.extend(m for m, _q in mids)

    def publish(self, topic, payload, qos=1, retain=False):
        super().publish(topic, payload, qos, retain)
        if topic.endswith("/ack"):
            self.sent.append((topic, payload))


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
            assert ckpt.dump(str(tmp_path / "r" / "part-000.db")) == ckpt.dump(a.path)
            # its state tables are current for readers of the file (merge, --rebuild-to)
            with sqlite3.connect(str(tmp_path / "r" / "part-000.db")) as r:
                assert r.execute("SELECT count(*) FROM state_journal").fetchone()[0] == 0
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


def test_a_takeover_folds_the_old_owners_journal_in_the_stream_too(tmp_path, monkeypatch):
    """The old owner stops between two folds (kill -9, or fenced): the stream holds its state
    changes since its last fold as journal rows only. The new owner's file folds them (the
    rebuild's last step); the stream must fold them at the same point (the claim), or the new
    owner's first fold (its own changed keys, then the journal emptied) drops them from every
    file rebuilt later: window state stuck at a revision its results are past (found by
    test_gateway_kill_partitions_rebuilt_from_jetstream_exactly_once, once in CI)."""
    from gateway import service
    monkeypatch.setattr(service, "STATE_FOLD_S", 1e9)  # a folds only when it stops
    monkeypatch.setattr(service, "STATE_FOLD_MAX", 1 << 30)

    async def go(c, gw):
        nc, js = await _connect(c, gw)
        try:
            st = ckpt.Settings(replicas=1, snapshot_min_bytes=1 << 30)  # no snapshot hides the tail
            obs = await ckpt.ensure(js, st)
            a = await Pipe(js, obs, st, 0, str(tmp_path / "a" / "part-000.db"), "a").start()
            msgs = _msgs(0, n_dev=3, per_dev=200)
            for i in range(0, len(msgs), 10):
                await a.feed(msgs[i:i + 10])
            assert len(a.ing.acked) == len(msgs)
            b = await Pipe(js, obs, st, 0, str(tmp_path / "b" / "part-000.db"), "b").start()
            assert not b.info.trusted
            assert isinstance((await a.stop())[0], StoreError)  # fenced: its final fold is not in the stream
            await b.feed(_msgs(6, n_dev=3, per_dev=60))  # other devices: b's own fold does not touch a's keys
            assert (await b.stop())[0] is None
            r = str(tmp_path / "r" / "part-000.db")
            await ckpt.rebuild(js, obs, st, 0, r)
            assert ckpt.dump(r) == ckpt.dump(b.path)
        finally:
            await nc.close()

    _on_secure_node(tmp_path, 1, go)


_ACK_FMT = ">BBBBIIqIBI"  # shared/wire_dev.py's ack layout: ..., boot, seq, ...


def _acked_marks(ing):
    """device -> highest seq the pipeline's device acks said committed."""
    from shared import wire
    out = {}
    for topic, payload in ing.sent:
        dev = wire.Topics("edgeflow").parse(topic.encode() if isinstance(topic, str) else topic)[0]
        seq = struct.unpack_from(_ACK_FMT, payload)[5]
        out[dev] = max(out.get(dev, -1), seq)
    return out


def _readings_of(path):
    c = sqlite3.connect(path)
    try:
        return dict(c.execute("SELECT device, count(*) FROM readings GROUP BY device").fetchall())
    finally:
        c.close()


def test_stale_owner_is_fenced_and_acks_nothing(tmp_path):
    """Owner a runs; gateway b takes the partition over (rebuild + claim) while a still
    runs (a stalled owner that has not noticed its lease is gone). a's next commit is
    refused by JetStream: a stops, and not one message or device record of that commit is
    acked; b's state holds exactly what a had replicated; a's own file, ahead of the
    stream, is not trusted afterwards."""
    async def go(c, gw):
        nc, js = await _connect(c, gw)
        try:
            st = ckpt.Settings(replicas=1)
            obs = await ckpt.ensure(js, st)
            a = await Pipe(js, obs, st, 0, str(tmp_path / "a" / "part-000.db"), "a").start()
            first = _msgs(0, per_dev=100)
            await a.feed(first)
            assert len(a.ing.acked) == len(first)
            acked_before, marks_before = list(a.ing.acked), _acked_marks(a.ing)
            # b takes over from JetStream alone; its claim fences a
            b_path = str(tmp_path / "b" / "part-000.db")
            rep_b, info_b = await ckpt.prepare(js, obs, st, 0, b_path, "b")
            assert not info_b.trusted
            second = _msgs(6, per_dev=100)
            a.ing.push(second)
            await _until(lambda: a.task.done(), 30)
            err = (await a.stop())[0]
            assert isinstance(err, StoreError) and "fenced" in str(err), err
            assert a.ing.acked == acked_before  # nothing of the refused commit
            late = {d: s for d, s in _acked_marks(a.ing).items() if s > marks_before.get(d, -1)}
            assert not late, late  # no device was told to delete a record of it
            assert _readings_of(a.path).keys() > _readings_of(b_path).keys()  # a committed it locally only
            assert set(_readings_of(b_path)) == {"dev-%04d" % i for i in range(6)}
            # a's file is ahead of the stream: a retake rebuilds instead of trusting it
            rep_a2, info_a2 = await ckpt.prepare(js, obs, st, 0, a.path, "a")
            assert not info_a2.trusted and _readings_of(a.path) == _readings_of(b_path)
            # and b, fenced by that retake in turn, cannot append either
            with pytest.raises(ckpt.Fenced):
                await rep_b.publish(rep_b.next_id(), [("meta", [("x", 1)])])
        finally:
            await nc.close()

    _on_secure_node(tmp_path, 1, go)


def test_commit_waits_for_jetstream_and_is_never_acked_unreplicated(tmp_path):
    """NATS down during a commit: its acks wait while the publish is retried; NATS back
    within publish_timeout_s: acked then. Down for longer: the pipeline stops with nothing
    of that commit acked; a retake's file is the stream's state."""
    async def go(c, gw):
        import nats
        nc = await nats.connect(c.urls, reconnect_time_wait=0.2, max_reconnect_attempts=-1,
                                **Security(Config(dict(gw, metrics={"port": 0}))).nats_options())
        js = nc.jetstream(timeout=5)
        try:
            st = ckpt.Settings(replicas=1, publish_timeout_s=20.0)
            obs = await ckpt.ensure(js, st)
            a = await Pipe(js, obs, st, 0, str(tmp_path / "a" / "part-000.db"), "a").start()
            await a.feed(_msgs(0, per_dev=60))
            n0 = len(a.ing.acked)
            # 1) down briefly: the commit waits, then is acked
            c.kill(0)
            batch = _msgs(6, per_dev=60)
            a.ing.push(batch)
            await _until(lambda: a.gw.store.commits > 0 and a.rep.retries > 0, 20)
            await asyncio.sleep(0.5)
            assert len(a.ing.acked) == n0  # committed locally, not replicated: not acked
            c.start_node(0)
            await _until(lambda: len(a.ing.acked) == n0 + len(batch), 40)
            assert not a.task.done()
            # 2) down for longer than publish_timeout_s: stop, nothing acked
            st.publish_timeout_s = 1.5
            n1, marks1 = len(a.ing.acked), _acked_marks(a.ing)
            c.kill(0)
            a.ing.push(_msgs(12, per_dev=60))
            await _until(lambda: a.task.done(), 30)
            err = (await a.stop())[0]
            assert isinstance(err, StoreError) and "not replicated" in str(err), err
            assert len(a.ing.acked) == n1
            assert not {d: s for d, s in _acked_marks(a.ing).items() if s > marks1.get(d, -1)}
            c.start_node(0)
            c.wait_ready()
            # the stream has that commit or not (the client may flush the publish it gave up
            # on when it reconnects; then nothing was acked and the redelivery is a duplicate):
            # either way the retake's file is the stream's state
            for _ in range(10):  # fenced when that late publish lands mid-takeover: retried (the Owner does)
                try:
                    await ckpt.prepare(js, obs, st, 0, a.path, "a")
                    break
                except ckpt.Fenced:
                    await asyncio.sleep(0.5)
            fresh = str(tmp_path / "r" / "part-000.db")
            await ckpt.rebuild(js, obs, st, 0, fresh)
            assert _readings_of(a.path) == _readings_of(fresh)
            assert set(_readings_of(fresh)) >= {"dev-%04d" % i for i in range(12)}
        finally:
            await nc.close()

    _on_secure_node(tmp_path, 1, go)


@pytest.mark.slow
def test_gateway_kill_partitions_rebuilt_from_jetstream_exactly_once(tmp_path):
    """Separate disks: 3 NATS nodes (MQTT), 2 gateways each with its own directory, 8
    partitions, the fleet simulator (firmware App) over MQTT; kill -9 g0: g1, which never
    saw g0's files, rebuilds g0's partitions from JetStream (snapshots + deltas) and carries
    on; g0 restarts and partitions rebalance. Ground truth on files rebuilt from JetStream
    alone: 0 lost, 0 duplicated, windows equal to the recomputation; each rebuilt file equal
    table by table to its last owner's."""
    from tools.scaleout_site import scenario
    lines = []
    rep, fig = asyncio.run(scenario(str(tmp_path / "site"), devices=6, duration=20.0, gateways=2, partitions=8,
                                    log=lines.append, kill_node=None, checkpoint="replicated",
                                    snapshot_min_bytes=4096))
    text = "\n".join(lines)
    assert rep.ok, text
    assert rep.counts["delivered"] > 500 and rep.counts.get("held", 0) == 0, text
    assert fig["takeover_s"] is not None, text
    moved = fig["takeover_ckpt"]
    assert len(moved) >= 4 and not any(e["trusted"] for e in moved), text  # g1 had no file of them
    assert fig["ckpt_equal"] == (8, 8), text
    assert fig["ckpt_appended"][0] > 0 and fig["ckpt_appended"][1] > 0, text  # the owners' metrics
    assert any(i.snapshot_bytes for i in fig["rebuilt"].values()), text  # snapshots taken and used
    assert fig["misplaced"] == 0 and fig["merge"]["group_fired"] > 0, text


def test_first_replicated_take_seeds_the_stream_with_an_existing_file(tmp_path):
    """A site moving from shared files: the partition's file made without replication is
    kept on the first take (the stream is empty) and stored as the first snapshot, so a
    gateway on another disk rebuilds the same state."""
    async def go(c, gw):
        nc, js = await _connect(c, gw)
        try:
            st = ckpt.Settings(replicas=1)
            obs = await ckpt.ensure(js, st)
            old = str(tmp_path / "shared" / "part-000.db")
            g = Gateway(_cfg(old), ingest_factory=FeedIngest)
            task = asyncio.ensure_future(g.run())
            await _until(lambda: g.started.is_set(), 20)
            msgs = _msgs(0, per_dev=60)
            g.ingest.push(msgs)
            await _until(lambda: len(g.ingest.acked) == len(msgs), 30)
            g.stop()
            await task
            before = _readings_of(old)
            rep, info = await ckpt.prepare(js, obs, st, 0, old, "a")
            assert info.trusted and info.snapshot_bytes > 0 and _readings_of(old) == before
            other = str(tmp_path / "other" / "part-000.db")
            rep_b, info_b = await ckpt.prepare(js, obs, st, 0, other, "b")
            assert not info_b.trusted and _readings_of(other) == before
        finally:
            await nc.close()

    _on_secure_node(tmp_path, 1, go)
