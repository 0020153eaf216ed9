"""Data a person can read: channel names and units, views in real units with ISO times,
indexes for per-device time ranges, retention in bounded batches, the size staying flat."""
import asyncio
import sqlite3

import pytest

from gateway.config import Config, ConfigError
from gateway.store import Store, VIEWS
from tools import longrun_retention

T = 1767225600000  # 2026-01-01T00:00:00Z


def _store(tmp_path, channels=None):
    async def go():
        s = Store(str(tmp_path / "gw.db"), "NORMAL")
        await s.open()
        await s.prepare(Config({"channels": channels or {}}).channels)
        return s
    return asyncio.run(go())


def test_channel_map_config_and_errors():
    c = Config({"channels": {"0": {"name": "air", "unit": "degC"}, "7": {"name": "co2", "unit": "ppm"},
                             "device": {"node-02": {"0": {"name": "water", "unit": "degC"}}}}})
    assert c.channels[("*", 0)] == ("air", "degC") and c.channels[("*", 7)] == ("co2", "ppm")
    assert c.channels[("*", 1)] == ("hum", "%RH")  # the HAL's defaults stay
    assert c.channels[("node-02", 0)] == ("water", "degC")
    for bad, msg in (({"x": {"name": "a"}}, "channel key must be a number"),
                     ({"256": {"name": "a"}}, "channel key must be a number"),
                     ({"0": {"name": ""}}, "channels.0 must be"),
                     ({"0": {"name": "a", "scale": 2}}, "channels.0 must be"),
                     ({"device": {"bad id!": {}}}, "bad device id")):
        with pytest.raises(ConfigError, match=msg):
            Config({"channels": bad})


def test_channel_names_from_the_devices_file():
    from gateway.ops import channel_map
    devs = {"n1": {"ack_key": b"k", "channels": {"0": {"name": "inlet", "unit": "degC"}}}, "n2": {"ack_key": b"k"}}
    m = channel_map(Config({"channels": {"0": {"name": "air", "unit": "degC"}}}), devs)
    assert m[("n1", 0)] == ("inlet", "degC") and m[("*", 0)] == ("air", "degC") and ("n2", 0) not in m
    with pytest.raises(ConfigError, match="devices.n1.channels.x"):
        channel_map(Config(), {"n1": {"channels": {"x": {"name": "a"}}}})


def test_views_in_real_units_with_iso_times(tmp_path):
    _store(tmp_path, {"device": {"n2": {"0": {"name": "water", "unit": "degC"}}}})
    db = sqlite3.connect(str(tmp_path / "gw.db"))
    db.executemany("INSERT INTO readings VALUES (?,?,?,?,?,?,?)",
                   [("n1", 1, 0, T, 0, 0, 21500), ("n2", 1, 0, T + 1500, 0, 0, -1250), ("n1", 1, 1, T, 9, 0, 5)])
    db.execute("INSERT INTO window_results VALUES ('device','n1',1,?,?,2,10,400000,39000,41000,40000.0,500.0,?)",
               (T, T + 60000, T))
    db.execute("INSERT INTO anomalies VALUES ('n1',1,5,?,0,1,1,4500,52000,40000)", (T,))
    db.execute("INSERT INTO devices (device, online, last_seen_ms, fw) VALUES ('n1', 1, ?, '0.1.0')", (T,))
    db.commit()
    rows = db.execute("SELECT device, time, channel_name, value, unit FROM readings_v ORDER BY device, channel").fetchall()
    assert rows == [("n1", "2026-01-01T00:00:00.000Z", "temp", 21.5, "degC"),
                    ("n1", "2026-01-01T00:00:00.000Z", "ch9", 0.005, ""),
                    ("n2", "2026-01-01T00:00:01.500Z", "water", -1.25, "degC")]
    w = db.execute("SELECT key, channel_name, unit, start_time, end_time, revision, mean, min, max, std "
                   "FROM window_results_v").fetchone()
    assert w == ("n1", "hum", "%RH", "2026-01-01T00:00:00.000Z", "2026-01-01T00:01:00.000Z", 2, 40.0, 39.0, 41.0, 0.5)
    a = db.execute("SELECT time, device, type, what, channel_name, value, detail FROM alerts_v").fetchone()
    assert a == ("2026-01-01T00:00:00.000Z", "n1", "anomaly", "zscore", "hum", 52.0, "score 4.5, baseline 40.0")
    assert db.execute("SELECT last_seen FROM devices_v").fetchone() == ("2026-01-01T00:00:00.000Z",)
    for v in VIEWS:
        db.execute("SELECT * FROM %s LIMIT 1" % v).fetchall()  # every view compiles
    # channel names are stored: an export of the table carries them
    assert ("*", 0, "temp", "degC") in db.execute("SELECT * FROM channels").fetchall()


def test_per_device_time_range_uses_the_index(tmp_path):
    _store(tmp_path)
    db = sqlite3.connect(str(tmp_path / "gw.db"))
    for sql in ("SELECT * FROM readings WHERE device = ? AND t >= ? AND t < ?",
                "SELECT * FROM readings_v WHERE device = ? AND t >= ? AND t < ?"):
        plan = " ".join(r[3] for r in db.execute("EXPLAIN QUERY PLAN " + sql, ("n1", T, T + 1000)))
        assert "USING INDEX readings_device_t (device=? AND t>? AND t<?)" in plan, plan
    plan = " ".join(r[3] for r in db.execute("EXPLAIN QUERY PLAN SELECT * FROM device_windows WHERE device = ? "
                                             "AND t > ?", ("n1", T)))
    assert "USING INDEX device_windows_device_t" in plan, plan
    plan = " ".join(r[3] for r in db.execute("EXPLAIN QUERY PLAN SELECT * FROM alerts_v WHERE t > ?", (T,)))
    assert "cep_events_t" in plan and "anomalies_t" in plan, plan
    # retention's deletes seek by index: no statement scans a whole table
    from gateway.store import RETENTION, prune_sql
    for _key, table, col in RETENTION:
        plan = [r[3] for r in db.execute("EXPLAIN QUERY PLAN " + prune_sql(table, col), (T, 100))]
        assert not any(p.startswith("SCAN %s" % table) or p.startswith("SCAN x") for p in plan), (table, plan)


def test_retention_deletes_old_rows_in_bounded_batches(tmp_path):
    s = _store(tmp_path)
    db = sqlite3.connect(str(tmp_path / "gw.db"))
    old = [("n%d" % (i % 3), 1, i, T + i, i % 3, 0, i) for i in range(25000)]
    young = [("n%d" % (i % 3), 1, 30000 + i, T + 10 ** 7 + i, 0, 0, i) for i in range(1000)]
    db.executemany("INSERT INTO readings VALUES (?,?,?,?,?,?,?)", old + young)
    db.executemany("INSERT INTO devices (device) VALUES (?)", [("n0",), ("n1",), ("n2",)])
    db.executemany("INSERT INTO late (device, t, reason) VALUES ('n0', ?, 'x')", [(T,), (T + 10 ** 7,)])
    db.execute("INSERT INTO window_results (scope, key, channel, start, end) VALUES ('device','n0',0,?,?)",
               (T, T + 1000))
    db.commit()
    deleted_per_statement = []
    real = s.db.execute

    async def counting(sql, params=()):
        n = await real(sql, params)
        if sql.startswith("DELETE"):
            deleted_per_statement.append(n)
        return n

    async def go():
        s.db.execute = counting
        try:
            return await s.prune({"readings_days": T + 10 ** 6, "events_days": T + 10 ** 6}, 3000)
        finally:
            await s.close()
    out = asyncio.run(go())
    assert out == {"readings": 25000, "late": 1}  # results_days not set: window results kept
    assert max(deleted_per_statement) <= 3000 and len(deleted_per_statement) >= 9
    assert db.execute("SELECT count(*), min(t) FROM readings").fetchone() == (1000, T + 10 ** 7)
    assert db.execute("SELECT count(*) FROM window_results").fetchone() == (1,)


def test_without_the_readings_index_retention_still_deletes_in_batches(tmp_path):
    async def go():
        s = Store(str(tmp_path / "gw.db"), "NORMAL")
        await s.open()
        await s.prepare(Config().channels, index_readings=False)
        try:
            await s.db.executemany("INSERT INTO readings VALUES (?,?,?,?,?,?,?)",
                                   [("n1", 1, i, T + i, 0, 0, i) for i in range(5000)])
            idx = await s.db.execute_fetchall("SELECT name FROM sqlite_master WHERE name = 'readings_device_t'")
            out = await s.prune({"readings_days": T + 3000}, 1000)
            left = await s.db.execute_fetchall("SELECT count(*), min(t) FROM readings")
        finally:
            await s.close()
        return idx, out, left
    idx, out, left = asyncio.run(go())
    assert idx == [] and out == {"readings": 3000} and left == [(2000, T + 3000)]


def test_retention_config_gives_cutoffs():
    from gateway.ops import cutoffs
    c = Config({"retention": {"readings_days": 7, "results_days": 365}})
    cut = cutoffs(c, 10 ** 12)
    assert cut == {"readings_days": 10 ** 12 - 7 * 86400000, "results_days": 10 ** 12 - 365 * 86400000}
    assert cutoffs(Config(), 10 ** 12) == {}  # default: keep everything
    with pytest.raises(ConfigError):
        Config({"retention": {"readings_days": -1}})
    with pytest.raises(ConfigError, match="longer than a window can still be revised"):
        Config({"retention": {"results_days": 1 / 1440.0}, "windows": {"size_ms": 60000, "allowed_lateness_ms": 60000}})


@pytest.mark.broker
def test_long_run_database_size_flat(broker, tmp_path):
    """A simulated fleet for 30 s with raw readings kept 4 s: the used size levels off while
    records keep arriving (without retention the same run grows +66% in its second half)."""
    samples = longrun_retention.run(str(tmp_path / "site"), devices=8, duration=30, keep_s=4.0, sample_ms=50,
                                    every_s=2.0, broker=broker)
    mid, end, more = longrun_retention.growth(samples)
    assert more > 5000, "the fleet delivered too little to tell (%d records)" % more
    assert end <= mid * 1.15, "used size grew from %d to %d bytes" % (mid, end)
    steady = samples[-1][3]["readings"]
    assert steady < 0.5 * samples[-1][4], "readings are not being deleted: %s" % (samples[-1],)
    files_mid, files_end = samples[len(samples) // 2][2], samples[-1][2]
    assert files_end <= files_mid + 512 * 1024, (files_mid, files_end)  # freed pages are reused


def test_reading_spans_cover_the_raw_rows_serve_time_ranges_and_retention(tmp_path):
    """Raw readings are indexed per wire message (reading_spans: a rowid range each), not per
    row: every row the gateway stored lies in exactly one span that describes it, across a
    restart and for a message that is part duplicate (the one-by-one path); the documented
    range query uses the spans' index and returns what a plain filter returns; retention
    deletes whole spans older than the cutoff, in bounded transactions, and keeps them exact."""
    from gateway import store as gstore
    from shared import wire
    from tools import bench_compare as bc
    from tools import bench_gateway as bg
    msgs, n, _rows = bc.workload(12, 3, 90)
    db = str(tmp_path / "gw.db")
    bc.run_inproc(str(tmp_path), "gw", msgs, n, True)
    # after a restart: dev00000 resends its last 20 readings with 30 new ones after them
    last = max(wire.decode_data(p)[3][-1][0] for t, p in msgs if "dev00000" in t and t.endswith("/data"))
    recs = [(s, bc.T0 + 90000 + s, s % 3, 0, 7) for s in range(last - 19, last + 31)]
    more = [("edgeflow/d/dev00000/data", wire.encode_readings("dev00000", 1, recs))]
    cfg = bg.gateway_cfg(1883, db, "FULL")
    bc.tweak_cfg(True)(cfg)
    asyncio.run(bg._run_gateway(cfg, until_readings=30, ingest_factory=lambda c, s: bc.MemIngest(more, c, s)))
    c = sqlite3.connect(db)

    def check():
        rows = dict((r[0], r[1:]) for r in c.execute("SELECT rowid, device, boot, seq, t FROM readings"))
        covered = set()
        for dev, boot, s0, s1, t0, t1, a, b in c.execute("SELECT * FROM reading_spans"):
            ids = set(range(a, b + 1))
            assert not ids & covered and ids <= set(rows)
            covered |= ids
            got = [rows[i] for i in sorted(ids)]
            assert {g[:2] for g in got} == {(dev, boot)}
            assert min(g[2] for g in got) == s0 and max(g[2] for g in got) == s1
            assert min(g[3] for g in got) == t0 and max(g[3] for g in got) == t1
        assert covered == set(rows)
        return rows
    rows = check()
    assert len(rows) == n + 30
    assert c.execute("SELECT count(*) FROM reading_spans WHERE n_rows = 30".replace(
        "n_rows", "row_last - row_first + 1")).fetchone()[0] == 1  # the part-duplicate message
    q = {"device": "dev00003", "from": bc.T0 + 20000, "to": bc.T0 + 50000}
    want = c.execute("SELECT * FROM readings WHERE device = :device AND t >= :from AND t < :to", q).fetchall()
    assert sorted(c.execute(gstore.READINGS_RANGE, q).fetchall()) == sorted(want) and len(want) > 80
    plan = " ".join(r[3] for r in c.execute("EXPLAIN QUERY PLAN " + gstore.READINGS_RANGE, q))
    assert "reading_spans_device_t" in plan and "INTEGER PRIMARY KEY" in plan, plan
    cut = bc.T0 + 45000
    keep = {k for k, v in rows.items() if v[3] >= cut} | {k for k, v in rows.items() if c.execute(
        "SELECT 1 FROM reading_spans WHERE ? BETWEEN row_first AND row_last AND t_max >= ?", (k, cut)).fetchone()}

    async def prune():
        s = Store(db, "NORMAL")
        await s.open()
        await s.prepare(Config().channels, index_readings=False)
        calls = []
        real = s.db.run

        def counting(fn, *a):
            calls.append(fn.__name__)
            return real(fn, *a)
        s.db.run = counting
        try:
            return await s.prune({"readings_days": cut}, 500), calls
        finally:
            await s.close()
    out, calls = asyncio.run(prune())
    assert out == {"readings": len(rows) - len(keep)} and calls.count("_prune_spans") >= 3
    assert set(check()) == keep
