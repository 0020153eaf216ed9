"""The checkpointed state is the state: after every checkpoint, a gateway restored from the
database holds exactly what the running one holds (device rows and counters, dedup marks and
bitmaps, identities, watermarks, open windows). The commit writes only what changed, in narrow
rows where it can (issue 16); this checks that nothing changed is left out.
"""
import asyncio
import time

import pytest

from gateway.service import Gateway
from shared import wire
from tests.test_gateway_fakes import T0, readings
from tests.test_gateway_pipeline import NOW, TOP, StubIngest, cfg, deliver, dump, flush, hello


def state_of(gw):
    dd = gw.dedup
    return {
        "devices": {dev: gw.devices.row(d) for dev, d in gw.devices.devs.items()},
        "dedup": {(dev, b): tuple(st) for dev, d in dd.devs.items() for b, st in d.boots.items()},
        "dedup_devs": {dev: (d.min_boot, d.instance, d.nonce, d.retired, d.reflashes) for dev, d in dd.devs.items()},
        "watermarks": {dev: (w.max_t, w.online) for dev, w in gw.watermarks.devs.items() if w.max_t is not None},
        "global_wm": gw.watermarks.global_wm,
        "windows": {(ws.scope, key, ch, start): tuple(st) for ws in (gw.dev_windows, gw.group_windows)
                    for key, k in ws.keys.items() for (ch, start), st in k.wins.items()},
    }


async def restored(c):
    gw = Gateway(c)
    gw.ingest = StubIngest()
    await gw.open()
    try:
        return state_of(gw)
    finally:
        await gw.store.close()


def traffic():
    """Steps of (topic, payload) lists; a checkpoint after each step."""
    devs = ["s%d" % i for i in range(4)]
    steps = [[(TOP.hello(d), None) for d in devs]]
    seq = {d: 0 for d in devs}
    t = {d: T0 + 137 * i for i, d in enumerate(devs)}
    for step in range(8):
        msgs = []
        for i, d in enumerate(devs):
            if (step + i) % 3 == 2:
                continue  # not every device in every checkpoint
            n = 20 + 7 * i
            rs = [(seq[d] + k, t[d] + 300 * k, k % 3, 0, 20000 + 31 * k - 5 * step) for k in range(n)]
            if i == 1 and step % 2:  # times out of order within the message: the one-by-one path
                (s3, t3, c3, f3, v3), (s4, t4, c4, f4, v4) = rs[3], rs[4]
                rs[3], rs[4] = (s3, t4, c3, f3, v3), (s4, t3, c4, f4, v4)
            if i == 2 and step == 4:  # a gap left open (bitmap above the mark), filled later
                msgs.append((TOP.data(d), wire.encode_readings(d, 1, rs[n // 2:])))
                hold = wire.encode_readings(d, 1, rs[:n // 2])
            else:
                msgs.append((TOP.data(d), wire.encode_readings(d, 1, rs)))
            if i == 2 and step == 6:
                msgs.append((TOP.data(d), hold))
            if i == 3 and step % 3 == 1:  # a duplicate message
                msgs.append((TOP.data(d), wire.encode_readings(d, 1, rs[:10])))
            seq[d] += n
            t[d] += 300 * n
        if step == 2:
            msgs.append((TOP.data("s0"), b"\xe5garbage"))  # quarantined: the device's counter
            msgs.append((TOP.data("s1"), wire.encode_readings("s1", 1, [(seq["s1"], 1000, 0, 0, 1)])))  # bad time
            seq["s1"] += 1
        if step == 3:
            msgs.append((TOP.data("s3"), wire.encode_records("s3", 1, [
                (wire.KIND_STATUS, seq["s3"], t["s3"], 0, (100, 5, 600, 0, 0, 12, 40000, 1))])))
            seq["s3"] += 1
        if step == 5:
            msgs.append((TOP.state("s2"), wire.encode_state(False)))
            msgs.append((TOP.hello("s0"), "boot2"))  # a new boot
        if step == 7:  # late data for s0's boot 2, far behind the watermark
            msgs.append((TOP.data("s0"), wire.encode_readings("s0", 2, [(0, T0, 0, 0, 5), (1, T0 + 10, 1, 0, 6)])))
        steps.append(msgs)
    return steps


def test_restored_state_equals_running_state_after_every_checkpoint(tmp_path):
    c = cfg(tmp_path, windows={"size_ms": 4000, "allowed_lateness_ms": 2000})

    async def go():
        gw = Gateway(c)
        gw.ingest = StubIngest()
        await gw.open()
        try:
            for k, msgs in enumerate(traffic()):
                for topic, p in msgs:
                    if p is None:
                        hello(gw, topic.split("/")[-2], 1)
                    elif p == "boot2":
                        hello(gw, topic.split("/")[-2], 2)
                    else:
                        deliver(gw, topic, p, NOW)
                await flush(gw)
                want = state_of(gw)
                got = await restored(c)
                for part in want:
                    assert got[part] == want[part], (k, part)
            s = gw.stats
            assert s.duplicates and s.quarantined and s.window_results and s.late and s.window_revisions
            assert gw.dedup.devs["s0"].min_boot == 2 and gw.devices.devs["s3"].status
        finally:
            await gw.store.close()

    asyncio.run(go())


def test_channel_pattern_changes_between_batches_equal_one_by_one(tmp_path):
    """_add_run guesses a device's channels per tick from its last batch; a batch with another
    pattern (fewer, more, reordered or irregular channels) must aggregate the same."""
    pats = [lambda s: s % 3, lambda s: s % 2, lambda s: (2 - s) % 3, lambda s: 1, lambda s: (s * 7 // 5) % 3,
            lambda s: s % 4, lambda s: s % 3]
    rs = []
    for k, pat in enumerate(pats):
        for s in range(30 * k, 30 * k + 30):
            rs.append((s, T0 + 41 * s, pat(s), 0, 1000 + (s * 37) % 101))

    async def go(name, batches):
        gw = Gateway(cfg(tmp_path, name))
        gw.ingest = StubIngest()
        await gw.open()
        for b in batches:
            deliver(gw, TOP.data("n1"), wire.encode_readings("n1", 1, b))
        await flush(gw)
        await gw.store.close()

    asyncio.run(go("a.db", [rs[i:i + 30] for i in range(0, len(rs), 30)]))
    asyncio.run(go("b.db", [rs[i:i + 7] for i in range(0, len(rs), 7)]))
    asyncio.run(go("c.db", [[r] for r in rs]))
    for t in ("window_results", "window_revisions", "late", "open_windows"):
        a, b, c = (dump(str(tmp_path / n), t) for n in ("a.db", "b.db", "c.db"))
        assert a == b == c, t



def test_hot_device_rows_match_their_statement():
    from gateway import devices, store
    assert store.SQL["devices_hot"].count("?") == len(devices._HOT(devices.Device("x")))
    for c in devices.COUNTERS:
        assert " %s = ?" % c in store.SQL["devices_hot"]


def test_batches_equal_one_by_one_without_groups(tmp_path):
    """Without group windows _window_runs brings the watermark state up to date only where
    something is due: results, revisions, late rows and the watermarks they carry must still
    equal record-by-record processing, for time-ordered batches that span windows, make
    windows due mid-batch, and start in a window already due (late within the lateness, and
    beyond it)."""
    bursts = []
    seq = 0
    t = T0
    for k in range(60):
        b = []
        for m in range(9 + k % 5):
            b.append((seq, t, m % 3, 0, 500 + (seq * 53) % 211))
            seq += 1
            t += 97 + 13 * (k % 3)
        bursts.append(b)
        if k % 4 == 3:  # a sorted burst back in time: late within the lateness, then beyond
            bursts.append([(seq + m, t - 3100 + 350 * m, m % 2, 0, 7 + m) for m in range(7)])
            seq += 7
    merged = [list(bursts[0])]
    for b in bursts[1:]:
        if b[0][1] > merged[-1][-1][1] and len(merged[-1]) + len(b) <= 50:
            merged[-1].extend(b)
        else:
            merged.append(list(b))
    c = {"windows": {"size_ms": 1000, "allowed_lateness_ms": 1500, "groups": []},
         "watermark": {"out_of_orderness_ms": 250}}

    async def go(name, batches):
        gw = Gateway(cfg(tmp_path, name, **c))
        gw.ingest = StubIngest()
        await gw.open()
        assert not gw.groups
        for dev in ("n1", "n2"):
            for b in batches:
                deliver(gw, TOP.data(dev), wire.encode_readings(dev, 1, b))
        await flush(gw)
        s = gw.stats
        await gw.store.close()
        return s.late, s.window_revisions, s.window_results

    stats = [asyncio.run(go("a.db", merged)), asyncio.run(go("b.db", bursts)),
             asyncio.run(go("c.db", [[r] for b in bursts for r in b]))]
    assert stats[0] == stats[1] == stats[2] and min(stats[0]) > 0
    for t in ("window_results", "window_revisions", "late", "open_windows", "device_watermarks"):
        a, b, c = (dump(str(tmp_path / n), t) for n in ("a.db", "b.db", "c.db"))
        assert a == b == c, t


@pytest.mark.parametrize("merged", [False, True], ids=["fold-reads-journal", "fold-of-merged-rows"])
def test_state_journal_fold_equals_writing_every_checkpoint(tmp_path, merged):
    """Random checkpoints' state writes (upserts, deletes and re-inserts of the same keys, full
    and hot device rows in any order), applied as they come in one database and journaled then
    folded at random points (and at open) in another: the state tables end up identical. merged:
    the running gateway's fold, of the rows it merged as it journaled them (store.FoldMerge)."""
    import random
    import sqlite3
    from gateway import store

    rng = random.Random(16)
    devs = ["d%d" % i for i in range(6)]
    seen = set()

    def delta():
        full, hot = [], []
        for d in rng.sample(devs, 3):
            if d not in seen or rng.random() < 0.3:
                full.append((d, "fw%d" % rng.randrange(3), 1, 2, 3, 4, 5, 1, rng.randrange(9), 0)
                            + tuple(rng.randrange(99) for _ in range(10)) + (None,) * 9)
                seen.add(d)
            else:
                hot.append((rng.randrange(1000),) + tuple(rng.randrange(99) for _ in range(10)) + (d,))
        keys = [(d, b) for d in rng.sample(devs, 3) for b in (1, 2)]
        ups = [(d, b, rng.randrange(50), b"\x01" * rng.randrange(3)) for d, b in keys if rng.random() < 0.6]
        dels = [k for k in keys if k not in {u[:2] for u in ups} and rng.random() < 0.5]
        wins = [("device", d, ch, 60000 * rng.randrange(3)) for d in rng.sample(devs, 2) for ch in (0, 1)]
        ow = [w + (5, 6, rng.randrange(1 << 64), 1, 2, -1) for w in wins if rng.random() < 0.6]
        owd = [w for w in wins if w not in {o[:4] for o in ow} and rng.random() < 0.5]
        return [("devices", full), ("devices_hot", hot), ("dedup", ups), ("dedup_del", dels),
                ("dedup_devices", [(d, rng.randrange(3)) for d in rng.sample(devs, 1)]),
                ("device_identity", [(d, 7, rng.randrange(9), "", 0) for d in rng.sample(devs, 1)]),
                ("device_watermarks", [(d, rng.randrange(10 ** 6), 1) for d in rng.sample(devs, 2)]),
                ("open_windows", [o[:6] + (str(o[6]),) + o[7:] for o in ow]), ("open_windows_del", owd),
                ("meta", [("global_watermark", rng.randrange(10 ** 6))] if rng.random() < 0.5 else [])]

    a = sqlite3.connect(str(tmp_path / "a.db"), isolation_level=None)
    a.execute("PRAGMA synchronous=OFF")
    a.executescript(store.SCHEMA)
    b_path = str(tmp_path / "b.db")
    b = sqlite3.connect(b_path, isolation_level=None)
    b.execute("PRAGMA synchronous=OFF")
    b.executescript(store.SCHEMA)
    folds = 0
    fm = store.FoldMerge()
    for k in range(300):
        d = delta()
        store._transaction(a, d)
        w = [("state_journal", [(store.journal_entry(d),)])]
        fm.add(d)
        if rng.random() < 0.2:
            w.append(("state_fold", [fm.rows() if merged else ()]))
            fm = store.FoldMerge()
            folds += 1
        store._transaction(b, w)
        if k % 50 == 49:  # a restart: open folds
            b.close()
            b = sqlite3.connect(b_path, isolation_level=None)
            b.execute("PRAGMA synchronous=OFF")
            store.fold_journal(b)
            fm = store.FoldMerge()
    store.fold_journal(b)
    assert folds > 30 and not b.execute("SELECT count(*) FROM state_journal").fetchone()[0]
    for t in ("devices", "dedup", "dedup_devices", "device_identity", "device_watermarks", "open_windows", "meta"):
        q = "SELECT * FROM %s" % t
        assert sorted(a.execute(q).fetchall(), key=repr) == sorted(b.execute(q).fetchall(), key=repr), t


def test_state_journal_fold_keeps_the_latest_op_per_key():
    import sqlite3
    from gateway import store
    full = ("d1", "fw", 1, 2, 3, 4, 5, 1, 7, 0) + tuple(range(10)) + (None,) * 9
    hot = (999,) + tuple(range(50, 60)) + ("d1",)
    ow = ("device", "d1", 0, 0, 5, 6, "7", 1, 2, -1)
    seqs = [[("devices", [full])], [("devices_hot", [hot])], [("devices", [full])],  # full after hot wins
            [("open_windows", [ow])], [("open_windows_del", [ow[:4]])],  # deleted
            [("dedup_del", [("d1", 1)])], [("dedup", [("d1", 1, 5, b"")])],  # re-inserted
            [("device_watermarks", [("d1", 5, 1)])], [("device_watermarks", [("d1", 9, 0)])]]
    a = sqlite3.connect(":memory:", isolation_level=None)
    b = sqlite3.connect(":memory:", isolation_level=None)
    for c in (a, b):
        c.executescript(store.SCHEMA)
    for d in seqs:
        store._transaction(a, d)
        store._transaction(b, [("state_journal", [(store.journal_entry(d),)])])
    store._transaction(b, [("state_fold", [()])])
    for t in ("devices", "open_windows", "dedup", "device_watermarks"):
        assert a.execute("SELECT * FROM " + t).fetchall() == b.execute("SELECT * FROM " + t).fetchall(), t
    assert b.execute("SELECT count(*) FROM dedup").fetchone()[0] == 1


def test_a_stopped_gateway_leaves_the_state_tables_current_through_its_last_commit(tmp_path, monkeypatch):
    """run()'s last checkpoint folds the journal in a commit (so a replica applying the same
    writes, gateway/ckpt, gets it too); nothing is left in state_journal."""
    import sqlite3
    from gateway import store
    from tools import bench_compare as bc
    from tools import bench_gateway as bg

    keys = []
    orig = store.Store.commit

    async def commit(self, writes):
        keys.append([k for k, rows in writes if rows])
        return await orig(self, writes)

    monkeypatch.setattr(store.Store, "commit", commit)
    msgs, n, _rows = bc.workload(5, 3, 120)
    db = str(tmp_path / "gw.db")
    c = bg.gateway_cfg(1883, db, "NORMAL")
    bc.tweak_cfg(False)(c)
    c["checkpoint"]["max_messages"] = c["checkpoint"]["ahead_messages"] = 7  # several commits
    asyncio.run(bg._run_gateway(c, until_readings=n, ingest_factory=lambda cf, st: bc.MemIngest(msgs, cf, st)))
    assert sum("state_journal" in k for k in keys) > 3 and "state_fold" in keys[-1]
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT count(*) FROM state_journal").fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM device_watermarks").fetchone()[0] == 5
    assert conn.execute("SELECT sum(received) FROM devices").fetchone()[0] == n


def test_damaged_state_journal_row_is_a_clear_store_error(tmp_path):
    """A journal row that does not decode (a damaged file) stops the open with a StoreError
    that names the row, not a traceback from marshal."""
    import asyncio
    import sqlite3

    from gateway import store
    p = str(tmp_path / "g.db")
    with sqlite3.connect(p) as c:
        c.executescript(store.SCHEMA)
        c.execute("INSERT INTO state_journal (body) VALUES (?)", (b"\xff\x00damaged",))

    async def go():
        s = store.Store(p)
        try:
            await s.open()
        except store.StoreError as e:
            return str(e)
        finally:
            await s.close()
    assert "state journal row 1 is unreadable" in asyncio.run(go())


def _random_traffic(rng, devs, n_msgs):
    """Messages of every kind that changes checkpointed state, at random: in-order and
    duplicated batches, seq gaps (bitmaps), seqs beyond the dedup window, times out of order and
    far behind (late, revisions, purges), status records (full device rows), new boots past
    max_boots (retired boots), re-flashes (a new instance: every boot deleted, boot 1 again)
    and offline wills."""
    st = {d: {"boot": 1, "seq": 0, "t": T0 + 500 * i, "inst": 0xA1 + i} for i, d in enumerate(devs)}

    def hello_of(d):
        s = st[d]
        return TOP.hello(d), wire.encode_hello(d, s["boot"], 0, 0, 0, s["boot"], 0, s["inst"],
                                               rng.randrange(1, 1 << 32), "fw")

    out = [hello_of(d) for d in devs]
    for _ in range(n_msgs):
        d = rng.choice(devs)
        s = st[d]
        r = rng.random()
        if r < 0.04:  # a new boot (hello), or a re-flash: boot counter back to 1, a new instance
            if rng.random() < 0.4:
                s["inst"] += 0x100
                s["boot"] = 1
            else:
                s["boot"] += 1
            s["seq"] = 0
            out.append(hello_of(d))
            if rng.random() < 0.5:  # right away, beyond the window of the fresh boot
                out.append((TOP.data(d), wire.encode_readings(d, s["boot"], [(5000, s["t"], 0, 0, 1)])))
            continue
        if r < 0.07:
            out.append((TOP.state(d), wire.encode_state(rng.random() < 0.5)))
            continue
        if r < 0.11:
            out.append((TOP.data(d), wire.encode_records(d, s["boot"], [
                (wire.KIND_STATUS, s["seq"], s["t"], 0, (rng.randrange(999), 5, 600, 0, 0, 12, 40000, 1))])))
            s["seq"] += 1
            continue
        n = rng.randrange(1, 12)
        if rng.random() < 0.15:
            s["seq"] += rng.randrange(1, 4)  # a gap: the bitmap above the mark
        back = -rng.randrange(1, 20000) if rng.random() < 0.15 else 0  # late data
        rs = [(s["seq"] + k, s["t"] + back + 150 * k, k % 3, 0, rng.randrange(-9999, 9999)) for k in range(n)]
        if rng.random() < 0.2:
            rs[0], rs[-1] = (rs[0][0],) + rs[-1][1:2] + rs[0][2:], (rs[-1][0],) + rs[0][1:2] + rs[-1][2:]
        p = wire.encode_readings(d, s["boot"], rs)
        out.append((TOP.data(d), p))
        if rng.random() < 0.1:
            out.append((TOP.data(d), p))  # a duplicate
        s["seq"] += n
        s["t"] += 150 * n + rng.randrange(0, 900)
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fold_of_the_live_state_equals_the_fold_of_the_journal(tmp_path, monkeypatch, seed):
    """The running gateway's fold is read from its state (Gateway._fold_rows), not merged from
    the journal rows it wrote since the last fold: at every fold, in the same transaction, the
    state tables it leaves are compared with what folding those journal rows gives (a
    savepoint rolled back), on random traffic of every state change, folds at random
    checkpoints; and a gateway restored at the end holds the running one's state."""
    import random

    from gateway import store

    rng = random.Random(seed)
    tables = ("devices", "dedup", "dedup_devices", "device_identity", "device_watermarks", "open_windows", "meta")
    orig = store._fold
    checked = []

    def snap(conn):
        return {t: sorted(conn.execute("SELECT * FROM %s" % t).fetchall(), key=repr) for t in tables}

    def fold(conn, rows=None):
        if rows is None:
            return orig(conn, rows)
        conn.execute("SAVEPOINT journal")
        orig(conn, None)  # the journal rows since the last fold, merged (store.FoldMerge)
        want = snap(conn)
        conn.execute("ROLLBACK TO journal")
        conn.execute("RELEASE journal")
        n = orig(conn, rows)
        assert snap(conn) == want
        checked.append(sum(len(v) for v in want.values()))
        return n

    monkeypatch.setattr(store, "_fold", fold)
    c = cfg(tmp_path, windows={"size_ms": 3000, "allowed_lateness_ms": 4000}, dedup={"max_boots": 3},
            watermark={"out_of_orderness_ms": 500, "idle_timeout_ms": 10 ** 9})
    devs = ["m%d" % i for i in range(5)]
    msgs = _random_traffic(rng, devs, 700)

    async def go():
        gw = Gateway(c)
        gw.ingest = StubIngest()
        await gw.open()
        try:
            for topic, p in msgs:
                deliver(gw, topic, p, NOW)
                if rng.random() < 0.15:
                    gw._folded = float("-inf") if rng.random() < 0.4 else time.monotonic()
                    await flush(gw)
            gw._folded = float("-inf")
            await flush(gw)
            want = state_of(gw)
        finally:
            await gw.store.close()
        return gw, want

    gw, want = asyncio.run(go())
    s = gw.stats
    assert len(checked) > 10 and s.duplicates and s.late and s.window_revisions and gw.dedup.reflashes
    assert gw.dedup.evicted_boots or any(d.min_boot > 1 for d in gw.dedup.devs.values())
    got = asyncio.run(restored(c))
    for part in want:
        assert got[part] == want[part], part


def test_a_boot_back_after_a_reflash_in_one_checkpoint_does_not_keep_the_old_flash_mark(tmp_path):
    """A re-flash retires boot 1 (its row is to be deleted) and, in the same checkpoint, the new
    flash's boot 1 comes back with a seq beyond the dedup window (nothing marked). The old
    flash's mark must not survive a restart: the new flash's seq 0..99 would be duplicates
    then, acked and never stored."""
    c = cfg(tmp_path)
    dev = "rf1"

    def hello_of(inst):
        return wire.encode_hello(dev, 1, 0, 0, 0, 1, 0, inst, 0x77 + inst, "fw")

    async def first():
        gw = Gateway(c)
        gw.ingest = StubIngest()
        await gw.open()
        try:
            deliver(gw, TOP.hello(dev), hello_of(1))
            deliver(gw, TOP.data(dev), wire.encode_readings(dev, 1, readings(0, 100, T0)))
            await flush(gw)
            assert gw.dedup.hwm(dev, 1) == 99
            deliver(gw, TOP.hello(dev), hello_of(2))  # re-flashed: boot 1 again, from seq 0
            deliver(gw, TOP.data(dev), wire.encode_readings(dev, 1, [(5000, T0 + 10 ** 6, 0, 0, 1)]))
            await flush(gw)
            assert gw.dedup.hwm(dev, 1) == -1
        finally:
            await gw.store.close()

    async def second():
        gw = Gateway(c)
        gw.ingest = StubIngest()
        await gw.open()
        try:
            assert gw.dedup.hwm(dev, 1) == -1
            deliver(gw, TOP.data(dev), wire.encode_readings(dev, 1, readings(0, 100, T0 + 2 * 10 ** 6)))
            await flush(gw)
            return gw.stats.readings, gw.stats.duplicates
        finally:
            await gw.store.close()

    asyncio.run(first())
    assert asyncio.run(second()) == (100, 0)


def test_journaled_open_windows_in_their_live_form_fold_to_the_rows():
    """WindowSet.export() gives the changed windows as its live state lists (no row per window);
    the journal holds them as they are. Folded, they give the same open_windows rows as the rows
    written directly: a window changed, one deleted, one re-opened, a sum of squares past int64
    (stored as text), windows of both scopes."""
    import sqlite3
    from gateway import store
    from gateway.windows import WindowSet

    dev, grp = WindowSet("device", 1000, 0, 500), WindowSet("group", 1000, 0, 500)
    a = sqlite3.connect(":memory:", isolation_level=None)
    b = sqlite3.connect(":memory:", isolation_level=None)
    for c in (a, b):
        c.executescript(store.SCHEMA)
    steps = [
        lambda: (dev.add_agg("d1", 0, 0, 3, 30, 302, 9, 11, None), dev.add_agg("d2", 1, 2000, 1, 4, 1 << 70, 4, 4, None),
                 grp.add("g", 0, 100, 5, None)),
        lambda: (dev.add("d1", 0, 10, 7, None), dev.add("d1", 1, 1200, 1, None)),
        lambda: (dev.advance("d1", 1600), dev.advance("d2", 999), grp.advance("g", 999)),  # d1's first purged
        lambda: (dev.add("d1", 1, 1300, 2, 1600), grp.advance("g", 1600)),  # g's purged
        lambda: (),
    ]
    for step in steps:
        step()
        direct, journal = [], []
        for ws in (dev, grp):
            ups, dels, _res = ws.export()
            rows = ws.rows(ups, dels)
            direct += [("open_windows", rows[0]), ("open_windows_del", rows[1])]
            journal.append((ws.scope, ups, list(dels)))
        store._transaction(a, direct)
        store._transaction(b, [("state_journal", [(store.journal_entry([("windows", journal)]),)])])
    store._transaction(b, [("state_fold", [()])])
    q = "SELECT * FROM open_windows ORDER BY scope, key, channel, start"
    want = a.execute(q).fetchall()
    assert want == b.execute(q).fetchall()
    assert want == [("device", "d1", 1, 1000, 2, 3, "5", 1, 2, -1), ("device", "d2", 1, 2000, 1, 4, str(1 << 70), 4, 4, -1)]


def test_a_folds_multi_row_deletes_and_updates_equal_them_row_by_row():
    """store._many (a fold's device updates and deletes, several rows per statement) against the
    same rows one statement each: keys present and absent, repeated deletes, every chunk size."""
    import random
    import sqlite3
    from gateway import store

    rng = random.Random(7)
    for n in (1, 2, 3, 255, 499, 500, 501, 777, 1100):
        a, b = sqlite3.connect(":memory:"), sqlite3.connect(":memory:")
        for c in (a, b):
            c.executescript(store.SCHEMA)
            for d in range(400):
                c.execute("INSERT INTO devices VALUES (%s)" % ",".join("?" * 29), ("d%d" % d, "fw") + (1,) * 18 + (None,) * 9)
                for ch in range(3):
                    c.execute("INSERT INTO open_windows VALUES (?,?,?,?,?,?,?,?,?,?)",
                              ("device", "d%d" % d, ch, 0, 1, 2, "3", 4, 5, -1))
                    c.execute("INSERT INTO dedup VALUES (?,?,?,?)", ("d%d" % d, ch, 5, b""))
        hot = [(rng.randrange(10 ** 12),) + tuple(rng.randrange(99) for _ in range(10)) + ("d%d" % d,)
               for d in rng.sample(range(410), min(n, 410))]
        dels = [("device", "d%d" % rng.randrange(410), rng.randrange(4), 0) for _ in range(n)]
        ddels = [("d%d" % rng.randrange(410), rng.randrange(4)) for _ in range(n)]
        for key, rows in (("devices_hot", hot), ("open_windows_del", dels), ("dedup_del", ddels)):
            store._many(a, key, rows)
            b.executemany(store.SQL[key], rows)
        for t in ("devices", "open_windows", "dedup"):
            q = "SELECT * FROM %s ORDER BY 1, 2, 3" % t
            assert a.execute(q).fetchall() == b.execute(q).fetchall(), (n, t)


def test_a_fold_deletes_the_windows_the_table_holds_and_only_those():
    """WindowSet.fold_rows deletes a purged window only if the table holds it (restored, or
    written by an earlier fold): one opened and purged between two folds has no row."""
    from gateway.windows import WindowSet

    ws = WindowSet("device", 1000, 0, 0)
    ws.restore([("d", 0, 0, 1, 5, "25", 5, 5, -1)])  # in the table: restored
    ws.add("d", 0, 1500, 7, None)  # [1000, 2000): opened after the restore
    ws.export()
    ups, dels = ws.fold_rows()
    assert [u[1:4] for u in ups] == [("d", 0, 1000)] and dels == []
    ws.add("d", 0, 2500, 1, None)  # [2000, 3000): opened and purged before the next fold
    ws.advance("d", 3500)  # purges all three
    ws.export()
    ups, dels = ws.fold_rows()
    assert ups == [] and sorted(dels) == [("device", "d", 0, 0), ("device", "d", 0, 1000)]
