"""Downstream sinks: a transactional outbox in the gateway's SQLite and one worker per sink.

    checkpoint (service.py)  -> stage(): rows for table sink_outbox, in THE SAME transaction
                                as the results they carry (store.py commits them together)
    after the commit         -> committed(): counters, wake the workers
    worker (asyncio task)    -> oldest items of its sink -> transport.send() -> delete exactly the
                                items the sink acknowledged durably; failures: exponential
                                backoff with full jitter, then the same items again
    bounds                   -> per sink max items/bytes; over them the oldest non-alert items
                                are dropped (then, only if alerts alone overflow, the oldest
                                alerts), counted (edgeflow_sink_dropped) and logged. Ingest is
                                never blocked by a sink.

At-least-once transport + a stable idempotency key per row (tables.py) = exactly-once effects
at any receiver that dedups on the key (the collector, a webhook receiver, a JetStream stream
within its duplicate window). See docs/sinks.md.
"""
import asyncio
import json
import math
import random
import time

try:  # orjson encodes rows ~10x faster than json (0.09 vs 0.9 us per reading here): the sink's cost
    import orjson
except ImportError:  # pragma: no cover - optional
    orjson = None

from .. import logs
from ..config import ConfigError
from . import tables as T

SINK_TYPES = ("jetstream", "webhook", "mqtt")

# key -> (default, type, check, help); per sink type the keys it accepts (plus COMMON)
COMMON = {
    "name": (None, str, None, "sink name (unique; the outbox rows carry it)"),
    "type": (None, str, SINK_TYPES, "jetstream | webhook | mqtt"),
    "tables": (None, list, None, "tables or aliases to forward: readings, alerts, windows, records, all, ..."),
    "batch": (2000, int, (1, 100000), "rows per outbox item (webhook: 1, one POST per row)"),
    "max_items": (None, int, (1, 1 << 40), "outbox bound in rows (default [sinks] outbox_max_items)"),
    "max_bytes": (None, int, (1024, 1 << 50), "outbox bound in bytes (default [sinks] outbox_max_bytes)"),
    "retry_base_s": (0.5, float, (0.001, 3600), "first retry delay cap (full jitter: uniform(0, cap))"),
    "retry_max_s": (30.0, float, (0.01, 86400), "largest retry delay cap"),
    "timeout_s": (10.0, float, (0.1, 600), "per send: PubAck / HTTP response / PUBACK timeout"),
    "fetch": (32, int, (1, 10000), "outbox items per send round"),
}
TYPE_KEYS = {
    "jetstream": {
        "servers": (["nats://127.0.0.1:4222"], list, None, "NATS URLs"),
        "stream": ("EDGEFLOW_SINK", str, None, "stream name (not EDGEFLOW: the scale-out ingest stream's name)"),
        "subject_prefix": ("edgeflow.sink", str, None, "subject = <prefix>.<site>.<table>"),
        "create_stream": (True, bool, None, "create the stream if missing (config below)"),
        "replicas": (1, int, (1, 5), "stream replicas (3 on a 3-node cluster)"),
        "retention": ("workqueue", str, None, "workqueue (the collector reads it) or limits (a leaf node's site "
                                              "stream that the hub sources, docs/scale-out.md)"),
        "max_age_s": (0.0, float, (0, 86400 * 3650), "stream max age (0: none); set it with retention = limits"),
        "max_stream_bytes": (1 << 30, int, (1 << 20, 1 << 50), "stream max bytes (discard new when full)"),
        "duplicate_window_s": (600.0, float, (1, 86400 * 7), "JetStream dedup window on Nats-Msg-Id (>= the retry horizon)"),
        "credentials": ("", str, None, "NATS .creds file (optional)"),
        "tls_ca": ("", str, None, "CA (PEM) the servers' certificates must chain to: TLS, name checked"),
        "tls_server_name": ("", str, None, "name checked in the servers' certificates (default: the URL's host)"),
        "user": ("", str, None, "NATS user name (with password_file)"),
        "password_file": ("", str, None, "file holding the NATS password (mode 0600)"),
    },
    "webhook": {
        "url": (None, str, None, "POST target (http:// or https://)"),
        "rate": (10.0, float, (0.01, 100000), "requests per second at most (token bucket)"),
        "burst": (10, int, (1, 100000), "token bucket size"),
        "headers": ({}, dict, None, "extra HTTP headers (e.g. Authorization)"),
    },
    "mqtt": {
        "host": ("127.0.0.1", str, None, "broker host"),
        "port": (1883, int, (1, 65535), "broker port"),
        "client_id": ("", str, None, "default edgeflow-sink-<site>-<name>"),
        "topic": ("edgeflow/out/{site}/{table}/{source}", str, None,
                  "topic template: {site} {table} {source} (device id, or scope/key of a window)"),
        "format": ("json", str, ("json", "senml"), "json (one object per row) or senml (RFC 8428 pack per row)"),
        "username": ("", str, None, "MQTT user"),
        "password_file": ("", str, None, "file holding the MQTT password"),
        "tls_ca": ("", str, None, "CA file: TLS on, only this CA trusted (as [mqtt] tls_ca)"),
        "tls_server_name": ("", str, None, "name checked in the broker's certificate (default host)"),
        "tls_cert": ("", str, None, "client certificate (optional)"),
        "tls_key": ("", str, None, "client key (optional)"),
        "channels": ({}, dict, None, "channel number -> {name, unit, scale}: real units for SenML/JSON"),
    },
}
SECTION_DEFAULTS = {"site": "site", "outbox_max_items": 5000000, "outbox_max_bytes": 512 << 20}


def parse(raw, section):
    """[[sinks.sink]] list -> list of dicts with every key filled; ConfigError on any mistake."""
    from ..config import _check
    from shared import wire
    try:
        wire.check_topic_part(section["site"], "site", 64)
    except wire.WireError:
        raise ConfigError("sinks.site must be 1..64 of [A-Za-z0-9_-], got %r" % (section["site"],))
    out, names = [], set()
    for i, s in enumerate(raw):
        where = "sinks.sink[%d]" % i
        if not isinstance(s, dict):
            raise ConfigError(where + " must be a table")
        typ = s.get("type")
        if typ not in SINK_TYPES:
            raise ConfigError("%s.type must be one of %s, got %r" % (where, "/".join(SINK_TYPES), typ))
        keys = dict(COMMON, **TYPE_KEYS[typ])
        extra = set(s) - set(keys)
        if extra:
            raise ConfigError("%s: unknown keys %s (known: %s)" % (where, ", ".join(sorted(extra)), ", ".join(keys)))
        v = {}
        for k, (default, t, check, _h) in keys.items():
            if k not in s and default is None and k in ("name", "type", "url"):
                raise ConfigError("%s.%s is required" % (where, k))
            val = s.get(k, default)
            v[k] = val if val is None else _check("%s.%s" % (where, k), val, t, check if t is not str else None)
        try:
            wire.check_topic_part(v["name"], "sink", 64)
        except wire.WireError:
            raise ConfigError(where + ".name must be 1..64 of [A-Za-z0-9_-], got %r" % (v["name"],))
        if v["name"] in names:
            raise ConfigError("%s: duplicate sink name %r" % (where, v["name"]))
        names.add(v["name"])
        if typ == "mqtt" and v["format"] not in ("json", "senml"):
            raise ConfigError(where + ".format must be json or senml")
        if typ == "jetstream" and v["retention"] not in ("workqueue", "limits"):
            raise ConfigError(where + ".retention must be workqueue or limits")
        if typ == "webhook":
            if not v["url"].startswith(("http://", "https://")):
                raise ConfigError(where + ".url must start with http:// or https://")
            v["batch"] = 1
        v["tables"] = T.expand(v["tables"] if s.get("tables") is not None else _default_tables(typ), where + ".tables")
        v["max_items"] = v["max_items"] or section["outbox_max_items"]
        v["max_bytes"] = v["max_bytes"] or section["outbox_max_bytes"]
        if v["retry_max_s"] < v["retry_base_s"]:
            raise ConfigError(where + ": retry_max_s must be >= retry_base_s")
        out.append(v)
    return out


def dumps(obj):
    """Rows -> compact JSON bytes; NaN/inf become null (as SQLite stores NaN)."""
    if orjson is not None:
        try:
            return orjson.dumps(obj)
        except TypeError:  # an integer beyond 64 bits: the stdlib encoder takes it
            pass
    clean = [[None if isinstance(v, float) and not math.isfinite(v) else v for v in r] for r in obj]
    return json.dumps(clean, separators=(",", ":")).encode()


def _default_tables(typ):
    return {"webhook": ["alerts"], "mqtt": ["alerts", "windows"], "jetstream": ["records", "windows"]}[typ]


def make_transport(cfg, site):
    typ = cfg["type"]
    if typ == "jetstream":
        from .jetstream import JetStreamSink
        return JetStreamSink(cfg, site)
    if typ == "webhook":
        from .webhook import WebhookSink
        return WebhookSink(cfg, site)
    from .mqtt import MqttSink
    return MqttSink(cfg, site)


class Item:
    __slots__ = ("id", "table", "n", "nbytes", "created_ms", "msg_id", "body")

    def __init__(self, row):
        self.id, self.table, self.n, self.nbytes, self.created_ms, self.msg_id, self.body = row


class Worker:
    """One sink: its outbox counters, bounds and delivery loop."""

    def __init__(self, cfg, transport, db):
        self.cfg = cfg
        self.name = cfg["name"]
        self.tx = transport
        self.db = db
        self.items = self.rows = self.bytes = 0  # what its outbox holds (rows of results, outbox rows, bytes)
        self.oldest_ms = None
        self.delivered = self.delivered_items = 0
        self.dropped = {"items": 0, "alerts": 0}
        self.rejected = 0
        self.failures = 0
        self.attempt = 0
        self.last_error = ""
        self.wake = asyncio.Event()
        self.task = None

    def lag_seconds(self, now_ms):
        return max(0.0, (now_ms - self.oldest_ms) / 1000.0) if self.rows and self.oldest_ms is not None else 0.0

    async def run(self):
        next_try = 0.0
        while True:
            await self._trim()
            now = time.monotonic()
            if now >= next_try:
                items = await self._fetch()
                if items:
                    ok = await self._deliver(items)
                    if ok:
                        self.attempt = 0
                        next_try = 0.0
                        continue
                    self.failures += 1
                    self.attempt += 1
                    cap = min(self.cfg["retry_max_s"], self.cfg["retry_base_s"] * (2 ** min(self.attempt - 1, 30)))
                    next_try = time.monotonic() + random.uniform(0, cap)  # full jitter
            self.wake.clear()
            wait = next_try - time.monotonic() if next_try else 1.0
            try:
                await asyncio.wait_for(self.wake.wait(), max(0.01, min(wait, 1.0)))
            except asyncio.TimeoutError:
                pass

    async def _fetch(self):
        rows = await self.db.execute_fetchall(
            "SELECT id, tbl, n, bytes, created_ms, msg_id, body FROM sink_outbox WHERE sink = ? ORDER BY id LIMIT ?",
            (self.name, self.cfg["fetch"]))
        items = [Item(r) for r in rows]
        self.oldest_ms = items[0].created_ms if items else None
        return items

    async def _deliver(self, items):
        try:
            done, rejected, err = await self.tx.send(items)
        except Exception as e:  # noqa: BLE001 - a transport error is a failed round, retried
            done, rejected, err = [], [], "%s: %s" % (type(e).__name__, e)
        if rejected:
            self.rejected += len(rejected)
            logs.warning("sink_rejected", sink=self.name, items=len(rejected),
                         keys=",".join(i.msg_id for i in rejected[:5]))
        gone = done + rejected
        if gone:
            n, _b = await self._delete([i.id for i in gone])
            self.delivered += len(done)
            self.delivered_items += sum(i.n for i in done)
        if err:
            if err != self.last_error:
                logs.warning("sink_send_failed", sink=self.name, error=err[:300], pending_items=self.items)
            self.last_error = err
            return False
        if self.last_error:
            logs.info("sink_recovered", sink=self.name)
            self.last_error = ""
        return len(gone) == len(items)

    async def _delete(self, ids):
        n = b = 0
        for i in range(0, len(ids), 500):
            part = ids[i:i + 500]
            got = await self.db.execute_fetchall(
                "DELETE FROM sink_outbox WHERE id IN (%s) RETURNING n, bytes, alert" % ",".join("?" * len(part)), part)
            for rn, rb, _a in got:
                self.rows -= 1
                self.items -= rn
                self.bytes -= rb
                n += rn
                b += rb
        return n, b

    def over(self):
        return self.items > self.cfg["max_items"] or self.bytes > self.cfg["max_bytes"]

    async def _trim(self):
        """Over a bound: drop the oldest non-alert items, then (only if alerts alone overflow) alerts."""
        if not self.over():
            return
        for alert, what in ((0, "items"), (1, "alerts")):
            while self.over():
                cand = await self.db.execute_fetchall(
                    "SELECT id, n, bytes FROM sink_outbox WHERE sink = ? AND alert = ? ORDER BY id LIMIT 256",
                    (self.name, alert))
                if not cand:
                    break
                ex_items = self.items - self.cfg["max_items"]
                ex_bytes = self.bytes - self.cfg["max_bytes"]
                ids = []
                for rid, n, b in cand:
                    ids.append(rid)
                    ex_items -= n
                    ex_bytes -= b
                    if ex_items <= 0 and ex_bytes <= 0:
                        break
                n, _b = await self._delete(ids)
                self.dropped[what] += n
                logs.warning("sink_outbox_full_dropped", sink=self.name, dropped=what, rows=n, items_left=self.items,
                             bytes_left=self.bytes, max_items=self.cfg["max_items"], max_bytes=self.cfg["max_bytes"])


class SinkSet:
    """All configured sinks of one gateway. The hooks service.py calls: open(db), start(),
    stage(writes) in checkpoint(), committed(writes) after the commit, stop()."""

    def __init__(self, section, sink_cfgs, transports=None):
        self.site = section.site
        self.cfgs = sink_cfgs
        self._transports = transports
        self.workers = []
        self.db = None
        self._staged_dropped = 0

    def __bool__(self):
        return bool(self.cfgs)

    def forwards(self, table):
        """Whether any sink forwards this table (so the checkpoint builds its rows only then)."""
        return any(table in c["tables"] for c in self.cfgs)

    async def open(self, db):
        """db: the gateway's store.Database (one connection, its own thread) (the schema is there: store.py)."""
        self.db = db
        if not self.cfgs:
            return
        tx = self._transports or {}
        self.workers = [Worker(c, tx.get(c["name"]) or make_transport(c, self.site), db) for c in self.cfgs]
        by = {w.name: w for w in self.workers}
        for sink, rows, n, b, oldest in await db.execute_fetchall(
                "SELECT sink, count(*), sum(n), sum(bytes), min(created_ms) FROM sink_outbox GROUP BY sink"):
            w = by.get(sink)
            if w is None:
                logs.warning("sink_outbox_orphans", sink=sink, rows=rows,
                             hint="rows of a sink no longer configured stay in table sink_outbox")
                continue
            w.rows, w.items, w.bytes, w.oldest_ms = rows, n or 0, b or 0, oldest

    def start(self):
        for w in self.workers:
            w.task = asyncio.create_task(self._supervise(w), name="sink-" + w.name)

    async def _supervise(self, w):
        """A worker that raises (a database hiccup, a transport bug) is logged and restarted."""
        while True:
            try:
                await w.tx.open()
                await w.run()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001
                logs.warning("sink_worker_restart", sink=w.name, error=repr(e)[:300])
                w.failures += 1
                await asyncio.sleep(1.0)

    async def stop(self):
        for w in self.workers:
            if w.task is not None:
                w.task.cancel()
        await asyncio.gather(*[w.task for w in self.workers if w.task], return_exceptions=True)
        for w in self.workers:
            try:
                await w.tx.close()
            except Exception:  # noqa: BLE001 - closing a dead connection
                pass

    def stage(self, writes, now_ms=None):
        """Outbox rows for this checkpoint's writes (list of (table, rows)): one body per
        (table, chunk), shared by the sinks that want it."""
        now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
        src = {k: r for k, r in writes if r and k in T.TABLES}
        if not src:
            return []
        out = []
        cache = {}
        for c in self.cfgs:
            b = c["batch"]
            for table in c["tables"]:
                rows = src.get(table)
                if not rows:
                    continue
                key = (table, b)
                enc = cache.get(key)
                if enc is None:
                    enc = cache[key] = self._encode(table, rows, b)
                alert = 1 if T.TABLES[table][2] else 0
                name = c["name"]
                out.extend((name, table, alert, n, len(body), now_ms, mid, body) for n, mid, body in enc)
        return out

    def _encode(self, table, rows, batch):
        site = self.site
        head = ('{"v":%d,"site":%s,"table":"%s","rows":' % (T.FORMAT_VERSION, json.dumps(site), table)).encode()
        enc = []
        for i in range(0, len(rows), batch):
            chunk = rows[i:i + batch]
            enc.append((len(chunk), T.item_id(site, table, chunk), head + dumps(chunk) + b"}"))
        return enc

    def committed(self, writes):
        """After the checkpoint's commit: the staged rows exist now."""
        by = {w.name: w for w in self.workers}
        now = None
        for k, rows in writes:
            if k != "sink_outbox":
                continue
            for name, _t, _a, n, nbytes, created, _m, _b in rows:
                w = by.get(name)
                if w is not None:
                    w.rows += 1
                    w.items += n
                    w.bytes += nbytes
                    if w.oldest_ms is None:
                        w.oldest_ms = created
                    now = created
        if now is not None:
            for w in self.workers:
                w.wake.set()


def collect_metrics(gw):
    """Prometheus families for gateway/metrics.py (edgeflow_sink_*)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    sinks = getattr(gw, "sinks", None)
    if not sinks:
        return
    now = int(time.time() * 1000)
    p = "edgeflow_sink_"
    fams = {
        "outbox_items": GaugeMetricFamily(p + "outbox_items", "result rows waiting in the sink outbox", labels=["sink"]),
        "outbox_bytes": GaugeMetricFamily(p + "outbox_bytes", "bytes waiting in the sink outbox", labels=["sink"]),
        "lag": GaugeMetricFamily(p + "outbox_lag_seconds", "age of the oldest item waiting in the sink outbox",
                                 labels=["sink"]),
        "delivered": CounterMetricFamily(p + "delivered_items", "result rows the sink acknowledged", labels=["sink"]),
        "dropped": CounterMetricFamily(p + "dropped_items", "result rows dropped by the outbox bound (policy)",
                                       labels=["sink", "class"]),
        "rejected": CounterMetricFamily(p + "rejected", "items the sink refused permanently (4xx), deleted",
                                        labels=["sink"]),
        "failures": CounterMetricFamily(p + "send_failures", "failed send rounds (retried with backoff)",
                                        labels=["sink"]),
    }
    for w in sinks.workers:
        fams["outbox_items"].add_metric([w.name], w.items)
        fams["outbox_bytes"].add_metric([w.name], w.bytes)
        fams["lag"].add_metric([w.name], w.lag_seconds(now))
        fams["delivered"].add_metric([w.name], w.delivered_items)
        fams["dropped"].add_metric([w.name, "non_alert"], w.dropped["items"])
        fams["dropped"].add_metric([w.name, "alert"], w.dropped["alerts"])
        fams["rejected"].add_metric([w.name], w.rejected)
        fams["failures"].add_metric([w.name], w.failures)
    yield from fams.values()
