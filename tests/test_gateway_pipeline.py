"""The gateway's data path in-process, without a broker: decode -> dedup -> windows -> commit -> acks.

A stub stands in for the MQTT ingest, recording PUBACKs and published acks.
"""
import asyncio
import collections
import sqlite3
import time

import pytest

from gateway.service import Gateway
from shared import wire
from tests.test_gateway_fakes import T0, readings

TOP = wire.Topics()
NOW = int(time.time() * 1000)

# processing-time columns: differ between runs by nature
VOLATILE = {"quarantine": ("id", "received_ms"),
            "devices": ("last_seen_ms", "last_hello_ms", "duplicates", "quarantined", "live", "backlog_received")}


class StubIngest:
    def __init__(self):
        self.queue = collections.deque()
        self.maxsize = 1000
        self.pubacks = []
        self.published = []
        self.paused = False

    def puback(self, mids):
        self.pubacks.extend(mids)

    def publish(self, topic, payload, qos=1, retain=False):
        self.published.append((topic, payload))

    def acks(self, dev):
        return [wire.decode_ack(p) for t, p in self.published if t == TOP.ack(dev)]


def cfg(tmp_path, name="gw.db", **sections):
    c = {"store": {"path": str(tmp_path / name)}, "metrics": {"port": 0},
         "checkpoint": {"ack_interval_ms": 0},
         "watermark": {"out_of_orderness_ms": 0, "idle_timeout_ms": 10 ** 9},
         "windows": {"size_ms": 1000, "allowed_lateness_ms": 0,
                     "groups": [{"name": "all0", "devices": ["*"], "channel": 0}]}}
    for k, v in sections.items():
        c.setdefault(k, {}).update(v)
    return c


async def open_gw(c):
    gw = Gateway(c)
    gw.ingest = StubIngest()
    await gw.open()
    return gw


_mid = [0]


def deliver(gw, topic, payload, now=NOW):
    """What the processing loop does with one message."""
    _mid[0] += 1
    gw._handle(topic.encode(), payload, now)
    gw.out.mids.append((_mid[0], 1))


def hello(gw, dev, boot, next_seq=0):
    """A hello with nothing held below next_seq: the gateway acks only devices it has a nonce of."""
    deliver(gw, TOP.hello(dev), wire.encode_hello(dev, boot, next_seq, 0, 0, boot, next_seq, 0xA1, 0xB2, "fw"))


async def flush(gw):
    await gw.checkpoint()
    if gw._commit_task is not None:
        await gw._commit_task


def dump(path, table, skip_cols=()):
    db = sqlite3.connect(path)
    cur = db.execute("SELECT * FROM %s" % table)
    names = [c[0] for c in cur.description]
    skip = VOLATILE.get(table, ()) + tuple(skip_cols)
    keep = [i for i, n in enumerate(names) if n not in skip]
    rows = sorted((tuple(r[i] for i in keep) for r in cur), key=repr)
    db.close()
    return rows


def run(coro):
    return asyncio.run(coro)


# ------------------------------------------------------------------ tests


def test_readings_committed_then_pubacked_then_acked(tmp_path):
    async def go():
        gw = await open_gw(cfg(tmp_path))
        try:
            hello(gw, "n1", 7)
            deliver(gw, TOP.data("n1"), wire.encode_readings("n1", 7, readings(0, 50, T0)))
            assert gw.ingest.pubacks == [] and gw.ingest.acks("n1") == []  # nothing before the commit
            await flush(gw)
            assert len(gw.ingest.pubacks) == 2
            (ack,) = gw.ingest.acks("n1")
            boot, seq, t, credits, replay, flags, nonce = ack
            assert nonce == 0xB2
            # the ack's time beacon is the gateway's wall clock now
            assert (boot, seq, replay) == (7, 49, True) and flags & wire.ACK_HAS_TIME
            assert abs(t - time.time() * 1000) < 60000
        finally:
            await gw.store.close()
    run(go())
    assert len(dump(str(tmp_path / "gw.db"), "readings")) == 50
    res = dump(str(tmp_path / "gw.db"), "window_results")
    # 100 ms steps, 1 s windows: [T0, T0+1000) ... ; watermark T0+4900-1 fires windows ending <= T0+4900
    assert [r[3] - T0 for r in res if r[0] == "device"] == [0, 1000, 2000, 3000]
    assert all(r[6] == 10 for r in res)  # count
    assert {r[0] for r in res} == {"device", "group"}


@pytest.mark.parametrize("channel_of", [lambda s: s % 3, lambda s: (s * 7 // 5) % 3, lambda s: 4])
def test_fast_path_equals_one_by_one(tmp_path, channel_of):
    rs = readings(0, 200, T0, step_ms=37, channel=0)
    rs = [(s, t, channel_of(s), 0, v) for s, t, _c, _f, v in rs]

    async def go(name, batches):
        gw = await open_gw(cfg(tmp_path, name))
        for b in batches:
            deliver(gw, TOP.data("n1"), wire.encode_readings("n1", 1, b))
        await flush(gw)
        await gw.store.close()

    run(go("a.db", [rs[i:i + 50] for i in range(0, 200, 50)]))
    run(go("b.db", [[r] for r in rs]))
    # overlapping batches: half of every message is a duplicate
    run(go("c.db", [rs[:100]] + [rs[i:i + 50] for i in range(0, 200, 25)] + [rs[:100]]))
    # per-record watermarks: nothing, not even the watermark that fired a window, depends on batching
    for t in ("readings", "window_results", "window_revisions", "late", "open_windows", "dedup"):
        a, b, c = (dump(str(tmp_path / n), t) for n in ("a.db", "b.db", "c.db"))
        assert a == b == c, t


def test_bad_input_is_quarantined_never_raised(tmp_path):
    good = wire.encode_readings("n1", 1, readings(0, 5, T0))
    bad = {
        "truncated": good[:10],
        "bad_length": good + b"\0",
        "bad_magic": b"\x00" + good[1:],
        "newer_version": good[:1] + b"\x09" + good[2:],
        "oversize": b"\xe5" * (wire.MAX_PAYLOAD + 1),
        "empty": good[:20] + b"\0\0" + good[22:24],
    }
    secs = wire.encode_readings("n1", 1, [(10, T0 // 1000, 0, 0, 1)])
    micros = wire.encode_readings("n1", 1, [(11, T0 * 1000, 0, 0, 1)])
    old = wire.encode_readings("n1", 1, [(12, 1000, 0, 0, 1)])
    future = wire.encode_readings("n1", 1, [(13, NOW + 3 * 86400000, 0, 0, 1)])
    unsynced = wire.encode_readings("n1", 1, [(14, 5000, 0, wire.FLAG_UNSYNCED, 1)])

    async def go():
        gw = await open_gw(cfg(tmp_path))
        for p in bad.values():
            deliver(gw, TOP.data("n1"), p)
        deliver(gw, TOP.data("n1"), wire.encode_readings("n2", 1, readings(0, 5, T0)))  # spoofed
        deliver(gw, "edgeflow/d/bad.id/data", good)
        deliver(gw, TOP.hello("n1"), b"\xe5\x01\x04garbage")
        deliver(gw, TOP.state("n1"), b"junk")
        for p in (secs, micros, old, future, unsynced):
            deliver(gw, TOP.data("n1"), p)
        deliver(gw, TOP.data("n1"), good)
        deliver(gw, TOP.data("n1"), bad["truncated"])  # a redelivered bad message: one row
        await flush(gw)
        st = gw.stats.quarantined
        await gw.store.close()
        return st

    st = run(go())
    rows = dump(str(tmp_path / "gw.db"), "quarantine")
    reasons = sorted(r[4] for r in rows)
    for r in list(bad) + ["spoofed_device_id", "bad_device_id", "seconds_not_ms", "micros_not_ms",
                          "before_2020", "far_future"]:
        assert r in reasons, r
    assert st["truncated"] == reasons.count("truncated") + 1  # counted twice, stored once
    assert len(dump(str(tmp_path / "gw.db"), "unsynced")) == 1
    assert len(dump(str(tmp_path / "gw.db"), "readings")) == 5  # the good message got through


def test_gap_records_account_for_dropped_seqs(tmp_path):
    async def go():
        gw = await open_gw(cfg(tmp_path))
        hello(gw, "n1", 1)
        deliver(gw, TOP.data("n1"), wire.encode_readings("n1", 1, readings(0, 10, T0)))
        # device dropped 10..19 (outbox full) and says so with gap record seq 20
        deliver(gw, TOP.data("n1"), wire.encode_records("n1", 1, [(wire.KIND_GAP, 20, T0 + 3000, 0, (1, ((10, 10),)))]))
        deliver(gw, TOP.data("n1"), wire.encode_readings("n1", 1, readings(21, 5, T0)))
        await flush(gw)
        acks = gw.ingest.acks("n1")
        assert acks[-1][1] == 25  # contiguous past the dropped range
        assert gw.stats.dropped_by_device == 10 and gw.stats.readings == 15
        # the same gap again (device resent it): a duplicate, nothing counted twice
        deliver(gw, TOP.data("n1"), wire.encode_records("n1", 1, [(wire.KIND_GAP, 20, T0 + 3000, 0, (1, ((10, 10),)))]))
        await flush(gw)
        assert gw.stats.dropped_by_device == 10 and gw.stats.duplicates == 1
        await gw.store.close()
    run(go())
    (g,) = dump(str(tmp_path / "gw.db"), "gaps")
    assert g[4:] == (1, 10, 10, 10)
    dev = sqlite3.connect(str(tmp_path / "gw.db")).execute("SELECT received, dropped_by_device FROM devices").fetchone()
    assert dev == (16, 10)  # 15 readings + the gap record; 10 seqs dropped by the device


def test_late_records_revisions_and_late_table(tmp_path):
    c = cfg(tmp_path, windows={"allowed_lateness_ms": 1000, "groups": []})

    async def go():
        gw = await open_gw(c)
        send = lambda rs: deliver(gw, TOP.data("n1"), wire.encode_readings("n1", 1, rs))  # noqa: E731
        send([(0, T0 + 100, 0, 0, 10), (1, T0 + 900, 0, 0, 20)])
        send([(2, T0 + 1999, 0, 0, 1)])  # watermark T0+1998 >= end-1: [T0, T0+1000) fires, rev 0
        send([(3, T0 + 500, 0, 0, 30)])  # late, within lateness (T0+999+1000 > T0+1998): rev 1
        send([(4, T0 + 600, 0, 0, 40), (5, T0 + 700, 0, 0, 50)])  # rev 2, rev 3 (one per record)
        send([(6, T0 + 3000, 0, 0, 1)])  # watermark T0+2999 >= T0+999+1000: purged
        send([(7, T0 + 800, 0, 0, 60)])  # beyond lateness: table late
        await flush(gw)
        assert gw.stats.late == 1 and gw.stats.window_revisions == 3
        await gw.store.close()
    run(go())
    path = str(tmp_path / "gw.db")
    latest = [r for r in dump(path, "window_results") if r[3] == T0]
    assert len(latest) == 1 and latest[0][5] == 3 and latest[0][6:10] == (5, 150, 10, 50)
    revs = sorted((r[5], r[6]) for r in dump(path, "window_revisions") if r[3] == T0)
    assert revs == [(0, 2), (1, 3), (2, 4), (3, 5)]
    (late,) = dump(path, "late")
    assert late[:6] == ("n1", 1, 7, T0 + 800, 0, 60) and late[-1] == "beyond_allowed_lateness"


def test_device_records_go_to_their_tables(tmp_path):
    recs = [
        (wire.KIND_WINDOW, 0, T0, 0, (0, 60000, 60, -5, 5, 0, 3, 10, 59990)),
        (wire.KIND_CEP, 1, T0 + 10, 0, ("overheat", 2, 5000, (1, 2, 3))),
        (wire.KIND_ANOMALY, 2, T0 + 20, 0, (0, wire.DETECTOR_ZSCORE, 4500, 99000, 20000)),
        (wire.KIND_STATUS, 3, T0 + 30, 0, (100, 5, 600, 2, 1, -12, 50000, 3)),
    ]
    unsynced = [(wire.KIND_CEP, 4, 700, wire.FLAG_UNSYNCED, ("boot_burst", 1, 10, ()))]

    async def go():
        gw = await open_gw(cfg(tmp_path))
        hello(gw, "n1", 2)
        deliver(gw, TOP.data("n1"), wire.encode_records("n1", 2, recs))
        deliver(gw, TOP.data("n1"), wire.encode_records("n1", 2, unsynced))
        await flush(gw)
        assert gw.stats.alerts == 3 and gw.stats.unsynced == 1
        assert gw.ingest.acks("n1")[-1][1] == 4
        await gw.store.close()
    run(go())
    path = str(tmp_path / "gw.db")
    assert len(dump(path, "device_windows")) == 1
    cep = dump(path, "cep_events")
    assert [(r[5], r[8]) for r in cep] == [("overheat", "[1, 2, 3]"), ("boot_burst", "[]")]
    assert dump(path, "anomalies")[0][5:] == (0, 1, 4500, 99000, 20000)
    assert dump(path, "device_status")[0][5:] == (100, 5, 600, 2, 1, -12, 50000, 3)
    dev = sqlite3.connect(path).execute("SELECT outbox_records, outbox_dropped, clock_offset_ms FROM devices").fetchone()
    assert dev == (5, 2, -12)


def _workload():
    msgs = []
    for d in ("n1", "n2", "n3"):
        for i in range(0, 300, 30):
            msgs.append((TOP.data(d), wire.encode_readings(d, 1, readings(i, 30, T0, step_ms=50, channel=i % 2))))
    msgs.sort(key=lambda m: (m[1][10:14], m[0]))  # interleave devices by base seq
    msgs.insert(5, (TOP.data("n1"), wire.encode_records("n1", 1, [(wire.KIND_GAP, 300, T0, 0, (1, ((301, 9),)))])))
    msgs.append((TOP.data("n2"), b"\xe5\x01\x01broken"))
    return msgs


def test_restart_from_checkpoint_replay_gives_same_tables(tmp_path):
    """In-process crash: state after a commit, uncommitted work lost, everything redelivered."""
    msgs = _workload()

    async def straight():
        gw = await open_gw(cfg(tmp_path, "straight.db"))
        for t, p in msgs:
            deliver(gw, t, p)
        await flush(gw)
        await gw.store.close()

    async def crashy():
        path = "crashy.db"
        cut = [7, 19, 26]  # commit after these many messages, then "crash" a few later
        start = 0
        for c in cut + [len(msgs)]:
            gw = await open_gw(cfg(tmp_path, path))
            for t, p in msgs[:start]:  # redelivery of what was never acked: duplicates
                deliver(gw, t, p)
            for t, p in msgs[start:c]:
                deliver(gw, t, p)
            await flush(gw)
            for t, p in msgs[c:c + 3]:  # processed, never committed: lost with the crash
                deliver(gw, t, p)
            await gw.store.close()
            start = c

    run(straight())
    run(crashy())
    for t in ("readings", "window_results", "window_revisions", "late", "quarantine", "gaps", "open_windows",
              "dedup", "dedup_devices", "device_watermarks", "meta"):
        assert dump(str(tmp_path / "straight.db"), t) == dump(str(tmp_path / "crashy.db"), t), t


def test_hello_backlog_gets_credits_and_waiters_hold(tmp_path):
    c = cfg(tmp_path, admission={"max_replayers": 1, "credit_chunk": 100, "replay_burst": 1000})

    async def go():
        gw = await open_gw(c)
        deliver(gw, TOP.hello("n1"), wire.encode_hello("n1", 3, 500, 0, 300, 2, 40, 11, 12, "fw1"))
        deliver(gw, TOP.hello("n2"), wire.encode_hello("n2", 1, 0, 0, 50, 1, 0, 21, 22, "fw1"))
        await flush(gw)
        a1 = gw.ingest.acks("n1")
        a2 = gw.ingest.acks("n2")
        assert sum(a[3] for a in a1) == 100 and all(a[4] for a in a1)  # credits, replay on
        assert a2 and all(a[3] == 0 and not a[4] for a in a2)  # waiting: hold
        # boot 2 below 40 is accounted (the device no longer has it): the ack says so
        assert (2, 39) in [(a[0], a[1]) for a in a1]
        assert gw.dedup.min_boot("n1") == 2
        deliver(gw, TOP.data("n1"), wire.encode_readings("n1", 2, readings(40, 100, T0)))
        await flush(gw)
        assert gw.stats.backlog == 100 and gw.stats.live == 0
        deliver(gw, TOP.data("n1"), wire.encode_readings("n1", 3, readings(500, 10, T0 + 60000)))
        await flush(gw)
        assert gw.stats.live == 10
        await gw.store.close()
    run(go())


def test_offline_device_leaves_group_watermark(tmp_path):
    async def go():
        gw = await open_gw(cfg(tmp_path))
        deliver(gw, TOP.data("n1"), wire.encode_readings("n1", 1, [(0, T0 + 100, 0, 0, 1)]))
        deliver(gw, TOP.data("n2"), wire.encode_readings("n2", 1, [(0, T0 + 100, 0, 0, 1)]))
        deliver(gw, TOP.data("n1"), wire.encode_readings("n1", 1, [(1, T0 + 5000, 0, 0, 1)]))
        await flush(gw)
        assert gw.watermarks.global_wm == T0 + 99  # n2 holds the group windows
        deliver(gw, TOP.state("n2"), wire.encode_state(False))
        await flush(gw)
        assert gw.watermarks.global_wm == T0 + 4999
        await gw.store.close()
    run(go())
    grp = [r for r in dump(str(tmp_path / "gw.db"), "window_results") if r[0] == "group"]
    assert [(r[3] - T0, r[6]) for r in grp] == [(0, 2)]


def test_seq_far_above_window_is_deferred_not_acked(tmp_path):
    c = cfg(tmp_path, dedup={"window": 64})

    async def go():
        gw = await open_gw(c)
        hello(gw, "n1", 1)
        deliver(gw, TOP.data("n1"), wire.encode_readings("n1", 1, readings(0, 10, T0)))
        deliver(gw, TOP.data("n1"), wire.encode_readings("n1", 1, readings(1000, 10, T0)))
        await flush(gw)
        assert gw.stats.deferred == 10 and gw.ingest.acks("n1")[-1][1] == 9
        await gw.store.close()
    run(go())
    assert len(dump(str(tmp_path / "gw.db"), "readings")) == 10
