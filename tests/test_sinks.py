"""Downstream sinks (gateway/sinks) and the collector, against real servers on 127.0.0.1:
the sink outbox in the gateway's SQLite, a real aiohttp webhook receiver that fails on purpose,
a real mosquitto for MQTT/SenML, a real nats-server (JetStream) for the collector.
Every loop is bounded; every server is stopped in finally."""
import asyncio
import json
import sqlite3
import threading
import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from gateway import collector as C
from gateway.config import Config, ConfigError
from gateway.sinks import SinkSet, Worker, collect_metrics, tables as T
from gateway.store import Store, StoreError
from tools.natscluster import NatsCluster, free_port
from tools.sinkfaults import WebhookReceiver

T0 = 1767225600000


def sinks_cfg(sinks, site="s1", **sec):
    return Config({"sinks": dict({"site": site, "sink": sinks}, **sec)}).sinks


def readings(dev, boot, first, n):
    return [(dev, boot, s, T0 + s * 10, s % 3, 0, 20000 + s) for s in range(first, first + n)]


def cep(dev, boot, seq):
    return (dev, boot, seq, T0 + seq, 0, "overheat", 2, 500, "[1,2]")


async def open_set(tmp_path, sinks, transports=None, **sec):
    store = Store(str(tmp_path / "gw.db"))
    await store.open()
    s = SinkSet(sinks_cfg(sinks, **sec), sinks_cfg(sinks, **sec).sink, transports)
    await s.open(store.db)
    return store, s


async def until(cond, n=400):
    """Poll cond every 50 ms, at most n times."""
    for _ in range(n):
        if cond():
            return True
        await asyncio.sleep(0.05)
    return False


async def stop_collector(task, coll):
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await coll.close()


async def checkpoint(store, s, writes):
    writes = list(writes)
    writes.append(("sink_outbox", s.stage(writes)))
    await store.commit(writes)
    s.committed(writes)


# ------------------------------------------------------------------ config and formats


def test_table_columns_match_the_store_schema(tmp_path):
    db = sqlite3.connect(":memory:")
    from gateway.store import SCHEMA
    db.executescript(SCHEMA)
    for t, (cols, key, _a) in T.TABLES.items():
        assert tuple(r[1] for r in db.execute("PRAGMA table_info(%s)" % t)) == cols, t
        assert set(key) <= set(cols)


def test_sink_config_validation():
    ok = sinks_cfg([{"name": "c", "type": "jetstream", "tables": ["alerts", "readings"]}]).sink[0]
    assert ok["tables"] == ("readings", "cep_events", "anomalies") and ok["replicas"] == 1
    wh = sinks_cfg([{"name": "w", "type": "webhook", "url": "http://127.0.0.1:1/x", "batch": 50}]).sink[0]
    assert wh["batch"] == 1 and wh["tables"] == ("cep_events", "anomalies")
    bad = [
        [{"name": "c", "type": "kafka"}],
        [{"name": "c", "type": "jetstream", "tables": ["nope"]}],
        [{"name": "c", "type": "jetstream", "bogus": 1}],
        [{"name": "c d", "type": "jetstream"}],
        [{"name": "c", "type": "jetstream"}, {"name": "c", "type": "jetstream"}],
        [{"name": "w", "type": "webhook"}],
        [{"name": "w", "type": "webhook", "url": "ftp://x"}],
        [{"name": "m", "type": "mqtt", "format": "xml"}],
        [{"name": "c", "type": "jetstream", "replicas": 0}],
        [{"name": "c", "type": "jetstream", "retry_base_s": 5.0, "retry_max_s": 1.0}],
        ["not a table"],
    ]
    for b in bad:
        with pytest.raises(ConfigError):
            sinks_cfg(b)
    with pytest.raises(ConfigError):
        sinks_cfg([], site="bad site")


def test_item_ids_are_stable_and_unique():
    rows = readings("d1", 3, 0, 5)
    assert T.item_id("s1", "readings", rows) == "s1/readings/d1/3/0+5"
    assert T.item_id("s1", "readings", rows[:1]) == "s1/readings/d1/3/0"
    w = ("group", "site-temp", 0, T0, T0 + 2000, 1, 4, 10, 1, 4, 2.5, 1.1, T0)
    assert T.row_key("window_revisions", w) == "group/site-temp/0/%d/1" % T0


# ------------------------------------------------------------------ outbox: transaction, bounds, metrics


class Down:
    """A transport whose sink is unreachable: every round fails."""
    calls = 0

    async def open(self):
        pass

    async def send(self, items):
        Down.calls += 1
        return [], [], "ConnectionRefusedError()"

    async def close(self):
        pass


def test_outbox_commits_with_the_results_and_a_failed_commit_leaves_neither(tmp_path):
    async def main():
        store, s = await open_set(tmp_path, [{"name": "c", "type": "jetstream", "tables": ["records"], "batch": 4}],
                                  {"c": Down()})
        try:
            await checkpoint(store, s, [("readings", readings("d1", 1, 0, 10)), ("cep_events", [cep("d1", 1, 10)])])
            rows = await store.db.execute_fetchall("SELECT tbl, n, msg_id, alert FROM sink_outbox ORDER BY id")
            assert rows == [("readings", 4, "s1/readings/d1/1/0+4", 0), ("readings", 4, "s1/readings/d1/1/4+4", 0),
                            ("readings", 2, "s1/readings/d1/1/8+2", 0), ("cep_events", 1, "s1/cep_events/d1/1/10", 1)]
            w = s.workers[0]
            assert (w.rows, w.items) == (4, 11)
            # a checkpoint whose transaction fails (a broken row) commits no outbox row either
            writes = [("readings", readings("d1", 1, 11, 3)), ("devices", [("x",)])]
            writes.append(("sink_outbox", s.stage(writes)))
            with pytest.raises(StoreError):
                await store.commit(writes)
            n = await store.db.execute_fetchall("SELECT count(*) FROM sink_outbox")
            r = await store.db.execute_fetchall("SELECT count(*) FROM readings")
            assert n[0][0] == 4 and r[0][0] == 10
        finally:
            await store.close()
    asyncio.run(main())


def test_outbox_bound_drops_oldest_non_alerts_counted_and_keeps_alerts(tmp_path):
    async def main():
        store, s = await open_set(tmp_path, [{"name": "c", "type": "jetstream", "tables": ["records"], "batch": 10,
                                              "max_items": 100, "retry_base_s": 0.01, "retry_max_s": 0.02}],
                                  {"c": Down()})
        s.start()
        try:
            w = s.workers[0]
            for i in range(30):  # a sink down for "days": 30 checkpoints of 20 readings + 1 alert
                await checkpoint(store, s, [("readings", readings("d1", 1, i * 21, 20)),
                                            ("cep_events", [cep("d1", 1, i * 21 + 20)])])
                await asyncio.sleep(0.01)
            for _ in range(200):
                if not w.over():
                    break
                await asyncio.sleep(0.02)
            assert w.items <= 100 and not w.over()
            left = await store.db.execute_fetchall("SELECT sum(n), sum(alert) FROM sink_outbox")
            assert left[0][0] == w.items and left[0][1] == 30  # every alert kept
            assert w.dropped["items"] == 30 * 21 - w.items and w.dropped["alerts"] == 0
            oldest = await store.db.execute_fetchall("SELECT min(id) FROM sink_outbox WHERE alert = 0")
            newest = await store.db.execute_fetchall("SELECT max(id) FROM sink_outbox")
            assert oldest[0][0] > 30  # the oldest non-alert items went first
            assert newest[0][0] > oldest[0][0]

            class Gw:
                sinks = s
            fams = {f.name: f for f in collect_metrics(Gw)}
            assert fams["edgeflow_sink_outbox_items"].samples[0].value == w.items
            assert fams["edgeflow_sink_outbox_lag_seconds"].samples[0].value >= 0
            dropped = {tuple(sorted(x.labels.items())): x.value for x in fams["edgeflow_sink_dropped_items"].samples}
            assert dropped[(("class", "non_alert"), ("sink", "c"))] == w.dropped["items"]
            assert Down.calls > 0
            # the web view's state carries the same (gateway/web.py)
            from gateway.service import Gateway
            from gateway.web import WebView
            gw = Gateway({"security": {"insecure": True}, "store": {"path": str(tmp_path / "web.db")}})
            gw.sinks = s
            st = WebView(gw).state()["sinks"]
            assert st == [{"name": "c", "items": w.items, "lag_s": st[0]["lag_s"], "dropped": w.dropped["items"],
                           "failing": True}]
            # alerts alone over the bound: the oldest alerts go, counted separately
            w.cfg["max_items"] = 10
            w.wake.set()
            for _ in range(200):
                if not w.over():
                    break
                await asyncio.sleep(0.02)
            assert w.items <= 10 and w.dropped["alerts"] == 20
        finally:
            await s.stop()
            await store.close()
    asyncio.run(main())


def test_outbox_counters_survive_a_restart(tmp_path):
    async def main():
        cfg = [{"name": "c", "type": "jetstream", "tables": ["readings"]}]
        store, s = await open_set(tmp_path, cfg, {"c": Down()})
        await checkpoint(store, s, [("readings", readings("d1", 1, 0, 50))])
        await store.close()
        store, s = await open_set(tmp_path, cfg, {"c": Down()})
        try:
            w = s.workers[0]
            assert (w.rows, w.items) == (1, 50) and w.bytes > 0 and w.lag_seconds(T0 * 2) > 0
        finally:
            await store.close()
    asyncio.run(main())


# ------------------------------------------------------------------ webhook


def test_webhook_every_alert_exactly_once_at_a_receiver_failing_half_the_time(tmp_path):
    hook = WebhookReceiver(fail=0.5, stall_s=0.6, seed=3)
    n_alerts = 40

    async def main():
        store, s = await open_set(tmp_path, [{"name": "w", "type": "webhook", "url": hook.url, "timeout_s": 0.3,
                                              "retry_base_s": 0.01, "retry_max_s": 0.05, "rate": 1000.0}])
        s.start()
        try:
            for i in range(n_alerts // 4):
                await checkpoint(store, s, [("readings", readings("d1", 1, i * 10, 6)),
                                            ("cep_events", [cep("d1", 1, i * 10 + 6 + k) for k in range(4)])])
            w = s.workers[0]
            for _ in range(600):
                if w.rows == 0:
                    break
                await asyncio.sleep(0.05)
            assert w.rows == 0, (w.rows, w.last_error)
            assert w.failures > 0  # the receiver did fail
        finally:
            await s.stop()
            await store.close()
    try:
        asyncio.run(main())
    finally:
        hook.close()
    want = {"s1/cep_events/d1/1/%d" % (i * 10 + 6 + k) for i in range(n_alerts // 4) for k in range(4)}
    assert set(hook.applied) == want
    assert hook.dups > 0 and hook.errors > 0 and hook.no_key == 0  # resends happened and were absorbed
    body = json.loads(hook.applied["s1/cep_events/d1/1/6"])
    assert body["key"] == "s1/cep_events/d1/1/6" and body["columns"][:3] == ["device", "boot", "seq"]
    assert body["rows"] == [["d1", 1, 6, T0 + 6, 0, "overheat", 2, 500, "[1,2]"]]


def test_webhook_rate_limit_and_permanent_rejection(tmp_path):
    from aiohttp import web
    got = []

    async def main():
        async def h(req):
            got.append((time.monotonic(), req.headers["Idempotency-Key"]))
            return web.Response(status=422 if req.headers["Idempotency-Key"].endswith("/3") else 200)
        app = web.Application()
        app.router.add_post("/h", h)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        store, s = await open_set(tmp_path, [{"name": "w", "type": "webhook", "url": "http://127.0.0.1:%d/h" % port,
                                              "rate": 20.0, "burst": 2}])
        s.start()
        try:
            await checkpoint(store, s, [("cep_events", [cep("d1", 1, k) for k in range(12)])])
            w = s.workers[0]
            for _ in range(300):
                if w.rows == 0:
                    break
                await asyncio.sleep(0.05)
            assert w.rows == 0 and w.rejected == 1 and w.delivered == 11
        finally:
            await s.stop()
            await store.close()
            await runner.cleanup()
    asyncio.run(main())
    assert len(got) == 12
    # 20/s with a burst of 2: 12 requests cannot take less than (12 - 2) / 20 s
    assert got[-1][0] - got[0][0] >= 10 / 20.0 * 0.9


# ------------------------------------------------------------------ MQTT / SenML


def test_mqtt_senml_republish_deleted_only_after_puback(broker, tmp_path):
    msgs = []
    sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="senml-sub")
    sub.on_message = lambda c, u, m: msgs.append((m.topic, json.loads(m.payload)))
    sub.on_connect = lambda c, u, f, rc, p: c.subscribe("edgeflow/out/#", qos=1)  # again after the restart
    sub.reconnect_delay_set(0.1, 0.5)
    sub.connect(*broker.paho(sub, broker.service("sink-observer", "read")))
    tls = {}
    for name in ("m", "j"):  # one broker user per sink: the site broker uses the user name as client id
        user, pw = broker.credentials(broker.service("edgeflow-sink-" + name))
        (tmp_path / name).write_text(pw)
        tls[name] = {"port": broker.port, "username": user, "password_file": str(tmp_path / name),
                     "tls_ca": broker.ca_file, "tls_server_name": "localhost"}
    sub.loop_start()

    async def main():
        store, s = await open_set(tmp_path, [
            dict(tls["m"], name="m", type="mqtt", format="senml", tables=["readings", "alerts", "windows"],
                 retry_base_s=0.05, retry_max_s=0.2),
            dict(tls["j"], name="j", type="mqtt", format="json", tables=["readings"],
                 topic="edgeflow/out/json/{site}/{source}", retry_base_s=0.05, retry_max_s=0.2)])
        s.start()
        try:
            win = ("group", "site-temp", 0, T0, T0 + 2000, 0, 4, 86000, 21000, 22000, 21500.0, 400.0, T0 + 2000)
            await checkpoint(store, s, [("readings", readings("d1", 1, 0, 3)), ("cep_events", [cep("d1", 1, 3)]),
                                        ("window_revisions", [win])])
            for _ in range(200):
                if all(w.rows == 0 for w in s.workers) and len(msgs) >= 8:
                    break
                await asyncio.sleep(0.05)
            assert all(w.rows == 0 for w in s.workers)
            # broker down: items stay in the outbox (no PUBACK), delivered after it is back
            broker.stop(hold_port=True)
            await checkpoint(store, s, [("readings", readings("d1", 1, 10, 2))])
            await asyncio.sleep(1.0)
            assert s.workers[0].rows == 1 and s.workers[0].failures > 0
            broker.start()
            for _ in range(300):
                if all(w.rows == 0 for w in s.workers) and sub.is_connected():
                    break
                await asyncio.sleep(0.05)
            assert all(w.rows == 0 for w in s.workers)
        finally:
            await s.stop()
            await store.close()
    try:
        asyncio.run(main())
        time.sleep(0.5)
    finally:
        sub.loop_stop()
        sub.disconnect()
    by = {}
    for topic, p in msgs:
        by.setdefault(topic, []).append(p)
    r0 = by["edgeflow/out/s1/readings/d1"][0]
    assert r0 == [{"bn": "urn:edgeflow:s1:d1:", "bt": T0 / 1000.0, "n": "temp", "u": "Cel", "v": 20.0}]
    w = by["edgeflow/out/s1/window_revisions/group/site-temp"][0]
    assert w[0]["bn"] == "urn:edgeflow:s1:group:site-temp:" and w[0]["n"] == "temp_mean" and w[0]["v"] == 21.5
    assert by["edgeflow/out/s1/cep_events/d1"][0][0]["n"] == "cep_overheat"
    j = by["edgeflow/out/json/s1/d1"]
    assert j[0]["key"] == "s1/readings/d1/1/0" and j[0]["unit"] == "Cel" and j[0]["v"] == 20.0
    assert {p["seq"] for p in j} >= {0, 1, 2, 10, 11}  # the ones sent while the broker was down too


# ------------------------------------------------------------------ JetStream + collector


def test_jetstream_sink_collector_dedup_and_bad_input(tmp_path):
    """Gateway-side worker -> real JetStream -> collector: duplicates (same rows in a second item,
    the same item twice) stored once; garbage quarantined without stopping the collector."""
    cluster = NatsCluster(tmp_path / "nats", 1).start()
    url = cluster.urls[0]
    central = str(tmp_path / "central.db")

    async def main():
        import nats
        store, s = await open_set(tmp_path, [{"name": "c", "type": "jetstream", "servers": [url], "batch": 5,
                                              "tables": ["records", "windows"]}])
        s.start()
        coll = C.Collector(C.load_config(None, {"nats.servers": [url], "store.path": central}))
        ct = asyncio.ensure_future(coll.run())
        try:
            await checkpoint(store, s, [("readings", readings("d1", 1, 0, 12)), ("cep_events", [cep("d1", 1, 12)])])
            w = s.workers[0]
            for _ in range(200):
                if w.rows == 0:
                    break
                await asyncio.sleep(0.05)
            assert w.rows == 0
            nc = await nats.connect(url)
            js = nc.jetstream()
            # the same item again with the same Nats-Msg-Id: JetStream drops it within the window
            item = json.dumps({"v": 1, "site": "s1", "table": "readings", "rows": readings("d1", 1, 0, 2)})
            ack = await js.publish("edgeflow.sink.s1.readings", item.encode(),
                                   headers={"Nats-Msg-Id": "s1/readings/d1/1/0+5"})
            assert ack.duplicate
            # the same rows under another id (a resend after the window): the collector ignores them
            await js.publish("edgeflow.sink.s1.readings", item.encode(), headers={"Nats-Msg-Id": "other"})
            for bad in (b"\xff\x00", b"[]", json.dumps({"v": 1, "site": "s 1", "table": "readings", "rows": []}),
                        json.dumps({"v": 1, "site": "s1", "table": "readings", "rows": [["d1", 1, "x", 0, 0, 0, 0]]}),
                        json.dumps({"v": 1, "site": "s1", "table": "readings", "rows": [["d1", None, 5, 0, 0, 0, 0]]}),
                        json.dumps({"v": 1, "site": "s1", "table": "readings", "rows": [["d1", 1, 2 ** 63, 0, 0, 0, 0]]}),
                        json.dumps({"v": 1, "site": "s1", "table": "users", "rows": [[1]]})):
                await js.publish("edgeflow.sink.s1.readings", bad if isinstance(bad, bytes) else bad.encode())
            # a site publishing under another site's subject is refused
            await js.publish("edgeflow.sink.s2.readings", item.encode())
            late = json.dumps({"v": 1, "site": "s1", "table": "readings", "rows": readings("d1", 1, 100, 1)})
            await js.publish("edgeflow.sink.s1.readings", late.encode())
            await nc.close()
            await until(lambda: coll.messages >= 14)
            assert coll.messages == 14 and coll.bad == 8  # 4 items from the sink + 10 published here
        finally:
            await stop_collector(ct, coll)
            await s.stop()
            await store.close()
    try:
        asyncio.run(main())
    finally:
        cluster.stop()
    db = sqlite3.connect(central)
    assert db.execute("SELECT count(*), count(DISTINCT seq) FROM readings WHERE site = 's1'").fetchone() == (13, 13)
    assert db.execute("SELECT count(*) FROM cep_events").fetchone()[0] == 1
    assert db.execute("SELECT rows_dup FROM sites WHERE site = 's1'").fetchone()[0] == 2
    reasons = sorted(r[0] for r in db.execute("SELECT reason FROM quarantine"))
    assert reasons == ["bad_int_seq", "bad_int_seq", "bad_json", "bad_site", "bad_version", "null_key",
                       "subject_mismatch", "unknown_table"]
