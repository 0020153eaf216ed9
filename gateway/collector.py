"""edgeflow-collector: many sites' results from one NATS JetStream stream into one store.

    edgeflow-collector run --nats nats://127.0.0.1:4222 --db central.db
    edgeflow-collector run -c collector.toml          # [nats] [store] [log], see docs/scale-out.md
    edgeflow-collector status --db central.db

A durable pull consumer reads the stream the gateways' jetstream sinks publish to. Each fetched
batch is validated (untrusted: bad messages go to table quarantine, bounded), written in ONE
transaction with INSERT ... ON CONFLICT DO NOTHING on (site, key columns), committed, and only
then acked to JetStream. A crash before the ack = redelivery = rows already there = ignored
(counted as duplicates). Store: SQLite (default) or PostgreSQL through asyncpg (store.dsn).
"""
import argparse
import asyncio
import json
import math
import os
import re
import signal
import sqlite3
import sys
import time

try:
    import tomllib
except ImportError:  # python < 3.11
    import tomli as tomllib

from nats import errors as nats_errors

from . import logs

try:
    from orjson import loads
except ImportError:  # pragma: no cover
    loads = json.loads
from .sinks import tables as T
from .sinks.jetstream import NATS_SECURITY_KEYS, close_quietly
from .store import Database

SITE_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
TEXT_COLS = {"device", "scope", "key", "rule", "evidence", "kind"}
FLOAT_COLS = {("window_revisions", "mean"), ("window_revisions", "std")}
MAX_STR = 4096
QUARANTINE_MAX_ROWS = 100000
QUARANTINE_MAX_PAYLOAD = 4096
I64 = 1 << 63

DEFAULTS = {
    "nats": {"servers": ["nats://127.0.0.1:4222"], "stream": "EDGEFLOW_SINK", "subject_prefix": "edgeflow.sink",
             "durable": "edgeflow-collector", "create_stream": True, "replicas": 1, "max_stream_bytes": 1 << 30,
             "duplicate_window_s": 600.0, "batch": 256, "ack_wait_s": 30.0, "credentials": "",
             # TLS (only tls_ca trusted, tls_server_name checked) and user + password file
             "tls_ca": "", "tls_server_name": "", "user": "", "password_file": ""},
    "store": {"backend": "sqlite", "path": "central.db", "dsn": "", "synchronous": "FULL"},
    "log": {"level": "info", "format": "kv"},
}


class ConfigError(ValueError):
    pass


def load_config(path=None, over=None):
    data = {}
    if path:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError("%s: %s" % (path, e))
    cfg = {}
    for sec, keys in DEFAULTS.items():
        given = data.get(sec, {})
        extra = set(given) - set(keys)
        if extra:
            raise ConfigError("unknown key(s) in [%s]: %s" % (sec, ", ".join(sorted(extra))))
        cfg[sec] = dict(keys, **given)
    extra = set(data) - set(DEFAULTS)
    if extra:
        raise ConfigError("unknown section(s): %s" % ", ".join(sorted(extra)))
    for dotted, v in (over or {}).items():
        if v is not None:
            sec, k = dotted.split(".")
            cfg[sec][k] = v
    if cfg["store"]["backend"] not in ("sqlite", "postgres"):
        raise ConfigError("store.backend must be sqlite or postgres")
    if cfg["store"]["backend"] == "postgres" and not cfg["store"]["dsn"]:
        raise ConfigError("store.dsn is required for the postgres backend")
    return cfg


def _coltype(table, col, pg):
    if col in TEXT_COLS:
        return "TEXT"
    if (table, col) in FLOAT_COLS:
        return "DOUBLE PRECISION" if pg else "REAL"
    return "BIGINT" if pg else "INTEGER"


def ddl(pg=False):
    out = []
    for t, (cols, key, _a) in T.TABLES.items():
        body = ", ".join('"%s" %s' % (c, _coltype(t, c, pg)) for c in cols)
        out.append('CREATE TABLE IF NOT EXISTS %s (site TEXT NOT NULL, %s, PRIMARY KEY (site, %s))'
                   % (t, body, ", ".join('"%s"' % c for c in key)))
    out.append("CREATE TABLE IF NOT EXISTS sites (site TEXT PRIMARY KEY, first_ms BIGINT, last_ms BIGINT, "
               "messages BIGINT, rows_new BIGINT, rows_dup BIGINT)")
    out.append("CREATE TABLE IF NOT EXISTS quarantine (received_ms BIGINT, subject TEXT, reason TEXT, detail TEXT, "
               "payload %s)" % ("BYTEA" if pg else "BLOB"))
    return out


def validate(subject, data, prefix):
    """-> (site, table, rows) or raise ValueError(reason)."""
    try:
        d = loads(data)
    except (ValueError, UnicodeDecodeError):
        raise ValueError("bad_json")
    if not isinstance(d, dict) or d.get("v") != T.FORMAT_VERSION:
        raise ValueError("bad_version")
    site, table, rows = d.get("site"), d.get("table"), d.get("rows")
    if not isinstance(site, str) or not SITE_RE.match(site):
        raise ValueError("bad_site")
    if table not in T.TABLES:
        raise ValueError("unknown_table")
    if subject != "%s.%s.%s" % (prefix, site, table):
        raise ValueError("subject_mismatch")
    if not isinstance(rows, list) or not rows:
        raise ValueError("bad_rows")
    cols, key, _a = T.TABLES[table]
    kidx = T.key_index(table)
    n = len(cols)
    out = []
    for r in rows:
        if not isinstance(r, list) or len(r) != n:
            raise ValueError("bad_row_shape")
        for i, v in enumerate(r):
            c = cols[i]
            if v is None:
                if i in kidx:
                    raise ValueError("null_key")
            elif c in TEXT_COLS:
                if not isinstance(v, str) or len(v) > MAX_STR:
                    raise ValueError("bad_text_%s" % c)
            elif (table, c) in FLOAT_COLS:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and math.isinf(v)):
                    raise ValueError("bad_float_%s" % c)
            elif isinstance(v, bool) or not isinstance(v, int) or not -I64 <= v < I64:
                raise ValueError("bad_int_%s" % c)
        out.append(tuple(r))
    return site, table, out


class SqliteStore:
    """SQLite through store.Database: the connection lives in one thread and its calls run there
    in order, so close() (queued behind any write still running, e.g. one whose task SIGTERM
    cancelled) never closes the connection under a transaction."""

    def __init__(self, path, synchronous="FULL"):
        self.path = path
        self.sync = synchronous
        self.db = None
        self.q_rows = 0

    async def open(self):
        d = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(d, exist_ok=True)
        self.db = await Database.connect(self.path, isolation_level=None)
        self.q_rows = await self.db.run(self._prepare)

    def _prepare(self, db):
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=%s" % self.sync)
        for s in ddl(False):
            db.execute(s)
        return db.execute("SELECT count(*) FROM quarantine").fetchone()[0]

    def _write(self, db, batch, bad, now):
        """In the database thread, one transaction: batch = [(site, table, rows)],
        bad = [(subject, reason, detail, payload)]. Returns {site: [messages, new, duplicate rows]}."""
        per_site = {}
        quarantined = 0
        db.execute("BEGIN IMMEDIATE")
        try:
            for site, table, rows in batch:
                cols = T.TABLES[table][0]
                sql = 'INSERT OR IGNORE INTO %s (site, %s) VALUES (?, %s)' % (
                    table, ", ".join('"%s"' % c for c in cols), ",".join("?" * len(cols)))
                before = db.total_changes
                db.executemany(sql, [(site,) + r for r in rows])
                new = db.total_changes - before
                s = per_site.setdefault(site, [0, 0, 0])
                s[0] += 1
                s[1] += new
                s[2] += len(rows) - new
            for site, (m, new, dup) in per_site.items():
                db.execute("INSERT INTO sites VALUES (?,?,?,?,?,?) ON CONFLICT(site) DO UPDATE SET last_ms=excluded.last_ms, "
                           "messages=messages+excluded.messages, rows_new=rows_new+excluded.rows_new, "
                           "rows_dup=rows_dup+excluded.rows_dup", (site, now, now, m, new, dup))
            for subject, reason, detail, payload in bad:
                if self.q_rows + quarantined < QUARANTINE_MAX_ROWS:
                    db.execute("INSERT INTO quarantine VALUES (?,?,?,?,?)",
                               (now, subject, reason, detail, payload[:QUARANTINE_MAX_PAYLOAD]))
                    quarantined += 1
            db.execute("COMMIT")
            self.q_rows += quarantined  # what committed (here: a cancelled task's write counts too)
        except BaseException:
            # SQLite may have rolled back already (SQLITE_FULL, I/O errors): a second ROLLBACK
            # would raise 'no transaction is active' and hide the real error
            if db.in_transaction:
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            raise
        return per_site

    async def write(self, batch, bad, now):
        return await self.db.run(self._write, batch, bad, now)

    async def close(self):
        if self.db is not None:
            db, self.db = self.db, None
            await db.close()


class PostgresStore:
    """PostgreSQL through asyncpg: INSERT ... SELECT FROM unnest(...) ON CONFLICT DO NOTHING, one
    statement per table per batch, all in one transaction."""

    def __init__(self, dsn):
        self.dsn = dsn
        self.conn = None
        self.q_rows = 0

    async def open(self):
        import asyncpg
        self.conn = await asyncpg.connect(self.dsn)
        for s in ddl(True):
            await self.conn.execute(s)
        self.q_rows = await self.conn.fetchval("SELECT count(*) FROM quarantine")

    async def write(self, batch, bad, now):
        per_site = {}
        grouped = {}
        for site, table, rows in batch:
            grouped.setdefault(table, []).extend((site,) + r for r in rows)
            s = per_site.setdefault(site, [0, 0, 0])
            s[0] += 1
            s[2] += len(rows)
        async with self.conn.transaction():
            for table, rows in grouped.items():
                cols = ("site",) + T.TABLES[table][0]
                types = ["text"] + [_coltype(table, c, True).lower() for c in cols[1:]]
                sql = 'INSERT INTO %s (%s) SELECT * FROM unnest(%s) ON CONFLICT DO NOTHING RETURNING site' % (
                    table, ", ".join('"%s"' % c for c in cols),
                    ", ".join("$%d::%s[]" % (i + 1, t) for i, t in enumerate(types)))
                got = await self.conn.fetch(sql, *[list(col) for col in zip(*rows)])
                for r in got:
                    s = per_site[r[0]]
                    s[1] += 1
                    s[2] -= 1
            for site, (m, new, dup) in per_site.items():
                await self.conn.execute(
                    "INSERT INTO sites VALUES ($1,$2,$2,$3,$4,$5) ON CONFLICT (site) DO UPDATE SET last_ms=EXCLUDED.last_ms, "
                    "messages=sites.messages+EXCLUDED.messages, rows_new=sites.rows_new+EXCLUDED.rows_new, "
                    "rows_dup=sites.rows_dup+EXCLUDED.rows_dup", site, now, m, new, dup)
            for subject, reason, detail, payload in bad:
                if self.q_rows < QUARANTINE_MAX_ROWS:
                    await self.conn.execute("INSERT INTO quarantine VALUES ($1,$2,$3,$4,$5)", now, subject, reason,
                                            detail, payload[:QUARANTINE_MAX_PAYLOAD])
                    self.q_rows += 1
        return per_site

    async def close(self):
        if self.conn is not None:
            await self.conn.close()
            self.conn = None


class Collector:
    def __init__(self, cfg):
        self.cfg = cfg
        st = cfg["store"]
        self.store = PostgresStore(st["dsn"]) if st["backend"] == "postgres" else SqliteStore(st["path"], st["synchronous"])
        self.stop_ev = None
        self.messages = self.rows_new = self.rows_dup = self.bad = 0
        self.nc = None

    async def run(self):
        import nats
        from nats.js import api
        from .sinks.jetstream import connect, ensure_stream, stream_config
        self.stop_ev = asyncio.Event()
        n = self.cfg["nats"]
        await self.store.open()
        self.nc = await connect(n["servers"], "edgeflow-collector", n["credentials"],
                                **{k: n[k] for k in NATS_SECURITY_KEYS})
        js = self.nc.jetstream(timeout=10)
        if n["create_stream"]:
            while True:
                try:
                    await ensure_stream(js, stream_config(n["stream"], n["subject_prefix"], n["replicas"],
                                                          n["max_stream_bytes"], n["duplicate_window_s"]))
                    break
                except (nats.errors.Error, asyncio.TimeoutError) as e:  # cluster still electing
                    logs.warning("collector_stream_wait", error=repr(e)[:200])
                    await asyncio.sleep(1)
        cc = api.ConsumerConfig(durable_name=n["durable"], ack_policy=api.AckPolicy.EXPLICIT,
                                ack_wait=n["ack_wait_s"], max_ack_pending=max(1000, 4 * n["batch"]))
        while True:
            try:
                sub = await js.pull_subscribe(n["subject_prefix"] + ".>", durable=n["durable"], stream=n["stream"],
                                              config=cc)
                break
            except (nats.errors.Error, asyncio.TimeoutError) as e:
                logs.warning("collector_consumer_wait", error=repr(e)[:200])
                await asyncio.sleep(1)
        logs.info("collector_started", servers=",".join(n["servers"]), stream=n["stream"], durable=n["durable"],
                  backend=self.cfg["store"]["backend"])
        prefix = n["subject_prefix"]
        while not self.stop_ev.is_set():
            try:
                msgs = await sub.fetch(n["batch"], timeout=1.0)
            except (asyncio.TimeoutError, nats.errors.TimeoutError):
                continue
            except nats.errors.Error as e:  # reconnecting, leader change: fetch again
                logs.warning("collector_fetch_failed", error=repr(e)[:200])
                await asyncio.sleep(0.5)
                continue
            await self.handle(msgs, prefix)

    async def handle(self, msgs, prefix):
        batch, bad = [], []
        for m in msgs:
            try:
                batch.append(validate(m.subject, m.data, prefix))
            except ValueError as e:
                bad.append((m.subject, str(e), "", bytes(m.data)))
        now = int(time.time() * 1000)
        per_site = await self.store.write(batch, bad, now)  # committed ...
        try:
            for m in msgs:  # ... then acked: a crash in between = redelivery = duplicates ignored
                await m.ack()
        except nats_errors.Error as e:  # connection lost: the unacked ones come again, ignored then
            logs.warning("collector_ack_failed", error="%s: %s" % (type(e).__name__, e))
        self.messages += len(msgs)
        self.bad += len(bad)
        for _m, new, dup in per_site.values():
            self.rows_new += new
            self.rows_dup += dup
        if bad:
            logs.warning("collector_quarantined", messages=len(bad), reason=bad[0][1])

    async def close(self):
        if self.nc is not None:
            await close_quietly(self.nc)
        await self.store.close()


def build_parser():
    p = argparse.ArgumentParser(prog="edgeflow-collector",
                                description="many sites' results from NATS JetStream into one store (site column)")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="consume the stream until SIGTERM/SIGINT")
    r.add_argument("--config", "-c", help="TOML file: [nats] [store] [log] (docs/scale-out.md)")
    r.add_argument("--nats", help="comma-separated NATS URLs (overrides nats.servers)")
    r.add_argument("--db", help="SQLite path (overrides store.path)")
    r.add_argument("--postgres", help="PostgreSQL DSN: use the postgres backend")
    r.add_argument("--replicas", type=int, help="stream replicas when the collector creates it")
    r.add_argument("--max-stream-bytes", type=int, help="stream max bytes when the collector creates it")
    s = sub.add_parser("status", help="per site: messages, new rows, duplicates ignored; rows per table")
    s.add_argument("--db", default="central.db")
    s.add_argument("--json", action="store_true")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.cmd == "status":
        return cmd_status(args)
    try:
        over = {"nats.servers": args.nats.split(",") if args.nats else None, "store.path": args.db,
                "nats.replicas": args.replicas, "nats.max_stream_bytes": args.max_stream_bytes}
        if args.postgres:
            over.update({"store.backend": "postgres", "store.dsn": args.postgres})
        cfg = load_config(args.config, over)
    except ConfigError as e:
        print("edgeflow-collector: config error: %s" % e, file=sys.stderr)
        return 2
    logs.setup(cfg["log"]["level"], cfg["log"]["format"])
    c = Collector(cfg)

    async def go():
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(c.run())
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            pass
        finally:
            await c.close()
            logs.info("collector_stopped", messages=c.messages, rows_new=c.rows_new, rows_dup=c.rows_dup, bad=c.bad)

    try:
        asyncio.run(go())
    except Exception as e:  # noqa: BLE001 - the store or the stream failed: nothing unacked is lost
        logs.error("collector_failed", error="%s: %s" % (type(e).__name__, e))
        return 1
    return 0


def cmd_status(args):
    if not os.path.exists(args.db):
        print("edgeflow-collector: no database %s" % args.db, file=sys.stderr)
        return 2
    db = sqlite3.connect("file:%s?mode=ro" % args.db, uri=True)
    sites = db.execute("SELECT site, messages, rows_new, rows_dup, last_ms FROM sites ORDER BY site").fetchall()
    tables = {t: dict(db.execute("SELECT site, count(*) FROM %s GROUP BY site" % t).fetchall()) for t in T.TABLES}
    q = db.execute("SELECT count(*) FROM quarantine").fetchone()[0]
    db.close()
    out = {"sites": [{"site": s, "messages": m, "rows_new": n, "rows_duplicate_ignored": d, "last_ms": l,
                      "rows": {t: tables[t].get(s, 0) for t in T.TABLES}} for s, m, n, d, l in sites],
           "quarantined": q}
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        for s in out["sites"]:
            print("%-20s messages %-8d new rows %-10d duplicates ignored %-8d %s" % (
                s["site"], s["messages"], s["rows_new"], s["rows_duplicate_ignored"],
                " ".join("%s=%d" % (t, n) for t, n in s["rows"].items() if n)))
        print("quarantined messages: %d" % q)
    return 0


if __name__ == "__main__":
    sys.exit(main())
