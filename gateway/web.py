"""Live web view: fleet table, window results over time, watermark, alerts, late and quarantine.

Served by aiohttp on the gateway's own asyncio loop, read-only (GET only). What it shows
comes from two places, and neither can stall the data path:
- in-memory state (devices, watermarks, counters), read on the loop in O(devices);
- committed history from a read-only SQLite connection (`mode=ro`) in a thread of its own.
One poller per gateway (not per page) builds an update every `web.update_ms` while at
least one page is open and pushes it to every page as a server-sent event; a page too
slow to take its updates is dropped (its browser reconnects and reloads the snapshot).

Access: bound to 127.0.0.1 by default. Bound elsewhere the config demands
`web.token_sha256`; a request must then carry the token as HTTP basic password (any user
name; the browser asks for it) or `Authorization: Bearer`. Only its SHA-256 is stored.
`web.tls_cert`/`tls_key` serve HTTPS. `/healthz` needs no token and says only ok/failing.
"""
import asyncio
import base64
import concurrent.futures
import hashlib
import hmac
import json
import os
import sqlite3
import ssl
import time

from aiohttp import web

from . import logs, metrics

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
ROW_LIMIT = 500  # rows of one table per update (the next update takes the rest)
FLEET_LIMIT = 2000  # devices listed in one update (the worst first)
_ISO = "strftime('%Y-%m-%dT%H:%M:%SZ', {} / 1000, 'unixepoch')"


def token_hash(token):
    return hashlib.sha256(token.encode()).hexdigest()


class History:
    """Read-only queries on the gateway's database, run in one worker thread."""

    def __init__(self, path):
        self.path = path
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="edgeflow-web-db")
        self.db = None

    def _conn(self):
        if self.db is None:
            self.db = sqlite3.connect("file:%s?mode=ro" % self.path, uri=True, timeout=2.0,
                                      check_same_thread=False)
            self.db.execute("PRAGMA query_only = 1")
        return self.db

    async def run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def close(self):
        def _close():
            if self.db is not None:
                self.db.close()
                self.db = None
        try:
            self.pool.submit(_close).result(5)
        except Exception:  # noqa: BLE001 - closing at shutdown
            pass
        self.pool.shutdown(wait=False)

    # ---- queries (worker thread)

    def cursors(self):
        db = self._conn()
        q = lambda t: db.execute("SELECT coalesce(max(rowid), 0) FROM %s" % t).fetchone()[0]  # noqa: E731
        return {t: q(t) for t in ("window_results", "cep_events", "anomalies", "late", "quarantine")}

    def window_rows(self, where, args, limit):
        db = self._conn()
        sql = ("SELECT rowid, scope, key, channel, start, end, revision, count, mean, min, max FROM window_results "
               "WHERE %s ORDER BY start DESC LIMIT ?" % where)
        return [[r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], _real(r[8]), _real(r[9]), _real(r[10])]
                for r in db.execute(sql, args + (limit,))]

    def history(self, key, points):
        """The last `points` results per channel of one device (or group), oldest first."""
        db = self._conn()
        out = []
        chans = [r[0] for r in db.execute("SELECT DISTINCT channel FROM window_results WHERE key = ?", (key,))]
        for ch in chans:
            rows = self.window_rows("key = ? AND channel = ?", (key, ch), points)
            out.extend(reversed(rows))
        return out

    def since(self, cur):
        """New rows since the cursors {table: rowid}; returns (rows, new cursors)."""
        db = self._conn()
        new = dict(cur)
        w = [r for r in self.window_rows("rowid > ?", (cur["window_results"],), ROW_LIMIT)]
        if w:
            new["window_results"] = max(r[0] for r in w)
        alerts = self._alerts("rowid > ?", (cur["cep_events"],), "rowid > ?", (cur["anomalies"],), new)
        late = self._late("rowid > ?", (cur["late"],), new)
        quar = self._quarantine("id > ?", (cur["quarantine"],), new)
        return {"windows": w, "alerts": alerts, "late": late, "quarantine": quar}, new

    def recent(self, n=50):
        cur = {}
        return {"alerts": self._alerts("1", (), "1", (), cur, n), "late": self._late("1", (), cur, n),
                "quarantine": self._quarantine("1", (), cur, n)}

    def _alerts(self, w1, a1, w2, a2, cur, n=ROW_LIMIT):
        db = self._conn()
        rows = []
        for r in db.execute("SELECT rowid, t, device, rule, severity, evidence FROM cep_events WHERE %s "
                            "ORDER BY rowid DESC LIMIT ?" % w1, a1 + (n,)):
            cur["cep_events"] = max(cur.get("cep_events", 0), r[0])
            rows.append({"t": r[1], "device": r[2], "type": "cep", "what": r[3], "level": "severity %s" % r[4],
                         "detail": _evidence(r[5])})
        for r in db.execute("SELECT rowid, t, device, channel, detector, score, value, baseline FROM anomalies "
                            "WHERE %s ORDER BY rowid DESC LIMIT ?" % w2, a2 + (n,)):
            cur["anomalies"] = max(cur.get("anomalies", 0), r[0])
            det = {1: "zscore", 2: "ewma"}.get(r[4], "detector %s" % r[4])
            rows.append({"t": r[1], "device": r[2], "type": "anomaly", "what": det, "channel": r[3],
                         "level": "score %.2f" % (r[5] / 1000.0),
                         "detail": "value %s, baseline %s" % (_real(r[6]), _real(r[7]))})
        rows.sort(key=lambda a: a["t"] or 0)
        return rows[-n:]

    def _late(self, w, a, cur, n=ROW_LIMIT):
        rows = []
        for r in self._conn().execute("SELECT rowid, t, device, channel, value, scope, key, window_start, reason "
                                      "FROM late WHERE %s ORDER BY rowid DESC LIMIT ?" % w, a + (n,)):
            cur["late"] = max(cur.get("late", 0), r[0])
            rows.append({"t": r[1], "device": r[2], "channel": r[3], "value": _real(r[4]), "scope": r[5],
                         "key": r[6], "window_start": r[7], "reason": r[8]})
        return rows[::-1]

    def _quarantine(self, w, a, cur, n=ROW_LIMIT):
        rows = []
        for r in self._conn().execute("SELECT id, received_ms, device, reason, detail, topic FROM quarantine "
                                      "WHERE %s ORDER BY id DESC LIMIT ?" % w, a + (n,)):
            cur["quarantine"] = max(cur.get("quarantine", 0), r[0])
            rows.append({"t": r[1], "device": r[2], "reason": r[3], "detail": (r[4] or "")[:200],
                         "topic": (r[5] or "")[:200]})
        return rows[::-1]


def _evidence(text):
    """CEP evidence: the wire's fixed-point values, shown in real units."""
    try:
        return "values " + ", ".join("%g" % (v / 1000.0) for v in json.loads(text)[:8])
    except (ValueError, TypeError):
        return str(text)[:200]


def _real(v):
    return None if v is None else round(v / 1000.0, 3)


class WebView:
    def __init__(self, gw):
        self.gw = gw
        self.cfg = gw.cfg.web
        self.hist = History(gw.cfg.store.path)
        self.clients = set()
        self.poller = None
        self.runner = None
        self.url = None
        self.updates = 0
        self.dropped_clients = 0
        self._last_readings = None
        self._h = self.cfg.token_sha256.encode() if self.cfg.token_sha256 else None

    # ---- lifecycle

    async def start(self):
        app = web.Application(middlewares=[self._auth])
        app.router.add_get("/", self._index)
        app.router.add_get("/api/snapshot", self._snapshot)
        app.router.add_get("/api/history", self._history)
        app.router.add_get("/api/events", self._events)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_static("/static/", STATIC, show_index=False)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self.runner.setup()
        ctx = None
        if self.cfg.tls_cert:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(self.cfg.tls_cert, self.cfg.tls_key)
        site = web.TCPSite(self.runner, self.cfg.host, self.cfg.port, ssl_context=ctx)
        await site.start()
        port = self.runner.addresses[0][1] if self.runner.addresses else self.cfg.port
        self.port = port
        self.url = "%s://%s:%d/" % ("https" if ctx else "http", self.cfg.host, port)
        return self

    async def stop(self):
        if self.poller:
            self.poller.cancel()
        for q in list(self.clients):
            q.put_nowait(None)
        if self.runner is not None:
            await self.runner.cleanup()
        self.hist.close()

    # ---- access

    @web.middleware
    async def _auth(self, request, handler):
        if self._h is not None and request.path != "/healthz" and not self._authorized(request):
            return web.Response(status=401, text="token required\n",
                                headers={"WWW-Authenticate": 'Basic realm="edgeflow", charset="UTF-8"'})
        resp = await handler(request)
        resp.headers.setdefault("Cache-Control", "no-store")
        resp.headers["X-Content-Type-Options"] = "nosniff"
        # only our own scripts run: what the page shows from devices is text, never markup
        resp.headers["Content-Security-Policy"] = ("default-src 'self'; style-src 'self' 'unsafe-inline'; "
                                                   "img-src 'self' data:; frame-ancestors 'none'")
        return resp

    def _authorized(self, request):
        h = request.headers.get("Authorization", "")
        token = None
        if h.startswith("Bearer "):
            token = h[7:].strip()
        elif h.startswith("Basic "):
            try:
                token = base64.b64decode(h[6:].strip(), validate=True).decode("utf-8").partition(":")[2]
            except (ValueError, UnicodeDecodeError):
                return False
        if not token:
            return False
        return hmac.compare_digest(token_hash(token).encode(), self._h)

    # ---- pages and API

    async def _index(self, request):
        return web.FileResponse(os.path.join(STATIC, "index.html"))

    async def _healthz(self, request):
        ok, why = metrics.health(self.gw, self.gw.cfg.metrics.health_max_commit_age_s)
        return web.Response(status=200 if ok else 503, text=("ok\n" if ok else "failing: %s\n" % "; ".join(why)))

    async def _metrics(self, request):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        reg = self.gw.metrics_registry or metrics.registry(self.gw)
        body = await asyncio.get_running_loop().run_in_executor(None, generate_latest, reg)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _snapshot(self, request):
        recent = await self.hist.run(self.hist.recent)
        state = self.state()
        state.update(recent)
        state["channels"] = self.channels()
        state["history_points"] = self.cfg.history_points
        state["groups"] = [g.name for g in self.gw.groups]
        return web.json_response(state)

    async def _history(self, request):
        key = request.query.get("key", "")[:64]
        rows = await self.hist.run(self.hist.history, key, self.cfg.history_points)
        return web.json_response({"key": key, "windows": rows})

    async def _events(self, request):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        q = asyncio.Queue(maxsize=8)
        self.clients.add(q)
        if self.poller is None or self.poller.done():
            self.poller = asyncio.ensure_future(self._poll())
        try:
            await resp.write(b"retry: 2000\n\n")
            while True:
                msg = await q.get()
                if msg is None:
                    break
                await resp.write(msg)
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.clients.discard(q)
        return resp

    # ---- live updates

    async def _poll(self):
        """One loop for all pages: every update_ms an event with the state and new rows."""
        cur = await self.hist.run(self.hist.cursors)
        every = self.cfg.update_ms / 1000.0
        while self.clients:
            await asyncio.sleep(every)
            try:
                rows, cur = await self.hist.run(self.hist.since, cur)
            except sqlite3.Error as e:  # the database is busy or gone: show the state anyway
                logs.warning("web_history_failed", error=str(e))
                rows = {}
            st = self.state()
            st.update(rows)
            msg = ("event: update\ndata: %s\n\n" % json.dumps(st, separators=(",", ":"))).encode()
            self.updates += 1
            for q in list(self.clients):
                try:
                    q.put_nowait(msg)
                except asyncio.QueueFull:  # a page that does not keep up: drop it, it reconnects
                    self.clients.discard(q)
                    self.dropped_clients += 1
                    _close_queue(q)

    def channels(self):
        return {("%s/%d" % (d, c)): [n, u] for (d, c), (n, u) in getattr(self.gw, "channels", self.gw.cfg.channels).items()}

    def state(self):
        """Fleet and global state from memory (no I/O)."""
        gw = self.gw
        s = gw.stats
        now = int(time.time() * 1000)
        mono = time.monotonic()
        wm = gw.watermarks
        fleet = []
        for d in gw.devices.devs.values():
            st = d.status  # (t, uptime_s, outbox_records, outbox_bytes, dropped, late, clock_offset_ms, ...)
            fleet.append({
                "device": d.dev, "online": bool(d.online), "last_seen": d.last_seen or None,
                "backlog": st[2] if st else None, "backlog_announced": d.backlog,
                "lag_ms": wm.lag(d.dev, now), "dropped": d.dropped_by_device + ((st[4] or 0) if st else 0),
                "quarantined": d.quarantined, "late": d.late, "received": d.received,
                "fw": d.fw, "clock_offset_ms": st[6] if st else None,
            })
        if len(fleet) > FLEET_LIMIT:  # worst first: offline, then the most lag
            fleet.sort(key=lambda r: (r["online"], -(r["lag_ms"] or 0)))
            fleet = fleet[:FLEET_LIMIT]
        rate = None
        if self._last_readings is not None and mono > self._last_readings[1]:
            rate = (s.readings - self._last_readings[0]) / (mono - self._last_readings[1])
        self._last_readings = (s.readings, mono)
        ing = gw.ingest
        return {
            "now": now, "global_watermark": wm.global_wm,
            "global_lag_ms": None if wm.global_wm is None else now - wm.global_wm,
            "active_devices": wm.active_count(), "devices": len(gw.devices.devs), "fleet": fleet,
            "readings": s.readings, "readings_per_s": rate, "late_total": s.late,
            "quarantined_total": sum(s.quarantined.values()), "alerts_total": s.alerts,
            "queue_depth": gw.queue_depth(), "broker_connected": bool(ing is not None and ing.connected.is_set()),
            "version": metrics.version(),
            # downstream sinks (gateway/sinks): outbox backlog, lag, drops by the bound
            "sinks": [{"name": w.name, "items": w.items, "lag_s": round(w.lag_seconds(now), 1),
                       "dropped": w.dropped["items"] + w.dropped["alerts"], "failing": bool(w.last_error)}
                      for w in getattr(gw.sinks, "workers", ())],
        }


def _close_queue(q):
    """Wake the dropped page's handler so it ends (its queue is full: make room for the end mark)."""
    try:
        q.get_nowait()
    except asyncio.QueueEmpty:
        pass
    q.put_nowait(None)
