"""SQLite store: the schema, one transaction per checkpoint, and state restore.

Journal WAL. synchronous=FULL by default: a device deletes a record once it is
acked, and acks follow the commit, so a commit must survive power loss, not
only a crash of the process (NORMAL in WAL mode can lose the last commits on
power loss). FULL costs one fsync per checkpoint (~0.2 ms here, a few ms on an
SD card), negligible at a few checkpoints per second.
"""
import asyncio
import functools
import marshal
import os
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import chain

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS readings (device TEXT, boot INTEGER, seq INTEGER, t INTEGER, channel INTEGER,
    flags INTEGER, value INTEGER);
CREATE TABLE IF NOT EXISTS reading_spans (device TEXT, boot INTEGER, seq_first INTEGER, seq_last INTEGER,
    t_min INTEGER, t_max INTEGER, row_first INTEGER, row_last INTEGER);
CREATE INDEX IF NOT EXISTS reading_spans_device_t ON reading_spans (device, t_max);
CREATE TABLE IF NOT EXISTS unsynced (device TEXT, boot INTEGER, seq INTEGER, t_since_boot_ms INTEGER,
    kind TEXT, channel INTEGER, flags INTEGER, value INTEGER);
CREATE TABLE IF NOT EXISTS device_windows (device TEXT, boot INTEGER, seq INTEGER, t INTEGER, flags INTEGER,
    channel INTEGER, size_ms INTEGER, count INTEGER, min INTEGER, max INTEGER, mean INTEGER, std INTEGER,
    first_dt INTEGER, last_dt INTEGER);
CREATE TABLE IF NOT EXISTS cep_events (device TEXT, boot INTEGER, seq INTEGER, t INTEGER, flags INTEGER,
    rule TEXT, severity INTEGER, span_ms INTEGER, evidence TEXT);
CREATE TABLE IF NOT EXISTS anomalies (device TEXT, boot INTEGER, seq INTEGER, t INTEGER, flags INTEGER,
    channel INTEGER, detector INTEGER, score INTEGER, value INTEGER, baseline INTEGER);
CREATE TABLE IF NOT EXISTS device_status (device TEXT, boot INTEGER, seq INTEGER, t INTEGER, flags INTEGER,
    uptime_s INTEGER, outbox_records INTEGER, outbox_bytes INTEGER, dropped INTEGER, late INTEGER,
    clock_offset_ms INTEGER, free_mem INTEGER, reconnects INTEGER);
CREATE TABLE IF NOT EXISTS gaps (device TEXT, boot INTEGER, seq INTEGER, t INTEGER, gap_boot INTEGER,
    first_seq INTEGER, length INTEGER, newly_accounted INTEGER);
CREATE TABLE IF NOT EXISTS window_results (scope TEXT, key TEXT, channel INTEGER, start INTEGER, end INTEGER,
    revision INTEGER, count INTEGER, sum INTEGER, min INTEGER, max INTEGER, mean REAL, std REAL,
    watermark INTEGER, PRIMARY KEY (scope, key, channel, start));
CREATE TABLE IF NOT EXISTS window_revisions (scope TEXT, key TEXT, channel INTEGER, start INTEGER,
    end INTEGER, revision INTEGER, count INTEGER, sum INTEGER, min INTEGER, max INTEGER, mean REAL, std REAL,
    watermark INTEGER, PRIMARY KEY (scope, key, channel, start, revision));
CREATE TABLE IF NOT EXISTS late (device TEXT, boot INTEGER, seq INTEGER, t INTEGER, channel INTEGER,
    value INTEGER, scope TEXT, key TEXT, window_start INTEGER, watermark INTEGER, reason TEXT);
CREATE TABLE IF NOT EXISTS quarantine (id INTEGER PRIMARY KEY, received_ms INTEGER, topic TEXT, device TEXT,
    boot INTEGER, seq INTEGER, reason TEXT, detail TEXT, payload BLOB, digest BLOB UNIQUE);
CREATE TABLE IF NOT EXISTS devices (device TEXT PRIMARY KEY, fw TEXT, hello_boot INTEGER,
    hello_next_seq INTEGER, backlog INTEGER, oldest_boot INTEGER, oldest_seq INTEGER, online INTEGER,
    last_seen_ms INTEGER, last_hello_ms INTEGER, received INTEGER, duplicates INTEGER,
    dropped_by_device INTEGER, skipped_by_hello INTEGER, quarantined INTEGER, late INTEGER,
    unsynced INTEGER, deferred INTEGER, live INTEGER, backlog_received INTEGER, status_t INTEGER,
    uptime_s INTEGER, outbox_records INTEGER, outbox_bytes INTEGER, outbox_dropped INTEGER,
    device_late INTEGER, clock_offset_ms INTEGER, free_mem INTEGER, reconnects INTEGER) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dedup (device TEXT, boot INTEGER, hwm INTEGER, bits BLOB,
    PRIMARY KEY (device, boot)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dedup_devices (device TEXT PRIMARY KEY, min_boot INTEGER) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS device_identity (device TEXT PRIMARY KEY, instance INTEGER, nonce INTEGER,
    retired TEXT, reflashes INTEGER) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS device_watermarks (device TEXT PRIMARY KEY, max_t INTEGER, online INTEGER) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS open_windows (scope TEXT, key TEXT, channel INTEGER, start INTEGER, count INTEGER,
    sum INTEGER, sumsq TEXT, min INTEGER, max INTEGER, revision INTEGER,
    PRIMARY KEY (scope, key, channel, start)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sink_outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, sink TEXT, tbl TEXT,
    alert INTEGER, n INTEGER, bytes INTEGER, created_ms INTEGER, msg_id TEXT, body BLOB);
CREATE INDEX IF NOT EXISTS sink_outbox_sink ON sink_outbox (sink, id);
CREATE TABLE IF NOT EXISTS state_journal (id INTEGER PRIMARY KEY, body BLOB);
CREATE INDEX IF NOT EXISTS window_results_start ON window_results (start);
"""

# Output tables (what a user queries / exports) and the state tables beside them. The tables
# upserted by key at every checkpoint (devices and the state) are WITHOUT ROWID: one B-tree
# per upsert instead of the table and its key index (about a fifth less per row here); a
# database made before keeps its tables as they are (same statements, same results).
OUTPUT_TABLES = ("readings", "unsynced", "device_windows", "cep_events", "anomalies", "device_status", "gaps",
                 "window_results", "window_revisions", "late", "quarantine", "devices")
STATE_TABLES = ("dedup", "dedup_devices", "device_identity", "device_watermarks", "open_windows", "meta")

# The state journal (issue 16). A checkpoint's changes to the per-device state (the write keys
# below: device rows, dedup marks, identities, watermarks, open windows, the global watermark)
# are one marshalled row of state_journal, in the same transaction as the outputs they go
# with, instead of a few upserts per device per checkpoint. A fold (write key "state_fold",
# about once a second, at every open and at close) applies the journal to those tables, each
# key once with its latest row, and empties it in the same transaction. So the database holds
# the exact state at every commit: tables + journal; the tables alone lag by up to a fold.
JOURNALED = ("devices", "devices_hot", "dedup", "dedup_del", "dedup_devices", "device_identity",
             "device_watermarks", "open_windows", "open_windows_del", "windows", "meta")
# "windows": the open windows as WindowSet.export() gives them, [(scope, {(key, channel, start):
# [count, sum, sumsq, min, max, revision]}, [(key, channel, start) deleted])]: marshalled as they
# are, no row tuple per window on the event loop (FoldMerge makes the rows). "open_windows" and
# "open_windows_del" (rows) are what journals written before it hold.
# upsert key -> (its delete key or None, key columns); rows of a delete key are key columns
_KEYED = {"dedup": ("dedup_del", 2), "dedup_devices": (None, 1), "device_identity": (None, 1),
          "device_watermarks": (None, 1), "open_windows": ("open_windows_del", 4), "meta": (None, 1)}
_DELETES = {d: up for up, (d, _k) in _KEYED.items() if d}
_I64 = 1 << 63


def open_window_row(scope, k, st):
    """The open_windows row of window k = (key, channel, start) with state list st =
    [count, sum, sumsq, min, max, revision]. sumsq: its TEXT column stores an int as the same
    text; only a value past int64 (which SQLite cannot bind) is made a str here, the rest
    SQLite converts in C."""
    n, s, sq, mn, mx, rev = st
    return (scope,) + k + (n, s, sq if sq < _I64 else str(sq), mn, mx, rev)


def journal_entry(state):
    """[(key, rows)] of JOURNALED keys -> the state_journal body. Marshal format 2: no
    back-references; with them (format 3+) marshal hashes every object the live state shares
    (each device id, each int of a window): 2.3x the time in the running gateway, for a body
    about a quarter smaller (_fold reads any format)."""
    return marshal.dumps([(k, rows) for k, rows in state if rows], 2)

_WINDOW_COLS = "scope, key, channel, start, end, revision, count, sum, min, max, mean, std, watermark"

# Insert statements, in the order a checkpoint applies them.
SQL = {
    "readings": "INSERT INTO readings VALUES (?,?,?,?,?,?,?)",
    # the same rows as one flat list, RAW_COLS values a row (the gateway's checkpoints)
    "readings_flat": "INSERT INTO readings VALUES (?,?,?,?,?,?,?)",
    # one row per wire message's raw readings: the readings' rowid range (see READINGS_RANGE)
    "reading_spans": "INSERT INTO reading_spans VALUES (?,?,?,?,?,?,?,?)",
    "unsynced": "INSERT INTO unsynced VALUES (?,?,?,?,?,?,?,?)",
    "device_windows": "INSERT INTO device_windows VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
    "cep_events": "INSERT INTO cep_events VALUES (?,?,?,?,?,?,?,?,?)",
    "anomalies": "INSERT INTO anomalies VALUES (?,?,?,?,?,?,?,?,?,?)",
    "device_status": "INSERT INTO device_status VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
    "gaps": "INSERT INTO gaps VALUES (?,?,?,?,?,?,?,?)",
    "late": "INSERT INTO late VALUES (?,?,?,?,?,?,?,?,?,?,?)",
    "quarantine": "INSERT OR IGNORE INTO quarantine (received_ms, topic, device, boot, seq, reason, detail, "
                  "payload, digest) VALUES (?,?,?,?,?,?,?,?,?)",
    "window_revisions": "INSERT OR REPLACE INTO window_revisions (%s) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)" % _WINDOW_COLS,
    "window_results": "INSERT OR REPLACE INTO window_results (%s) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)" % _WINDOW_COLS,
    "devices": "INSERT OR REPLACE INTO devices VALUES (%s)" % ",".join("?" * 29),
    # a device whose row exists and only its last_seen and counters changed (devices.Registry)
    "devices_hot": "UPDATE devices SET last_seen_ms = ?, received = ?, duplicates = ?, dropped_by_device = ?, "
                   "skipped_by_hello = ?, quarantined = ?, late = ?, unsynced = ?, deferred = ?, live = ?, "
                   "backlog_received = ? WHERE device = ?",
    "dedup": "INSERT OR REPLACE INTO dedup VALUES (?,?,?,?)",
    "dedup_del": "DELETE FROM dedup WHERE device = ? AND boot = ?",
    "dedup_devices": "INSERT OR REPLACE INTO dedup_devices VALUES (?,?)",
    "device_identity": "INSERT OR REPLACE INTO device_identity VALUES (?,?,?,?,?)",
    "device_watermarks": "INSERT OR REPLACE INTO device_watermarks VALUES (?,?,?)",
    "open_windows": "INSERT OR REPLACE INTO open_windows VALUES (?,?,?,?,?,?,?,?,?,?)",
    "open_windows_del": "DELETE FROM open_windows WHERE scope = ? AND key = ? AND channel = ? AND start = ?",
    "meta": "INSERT OR REPLACE INTO meta VALUES (?,?)",
    "state_journal": "INSERT INTO state_journal (body) VALUES (?)",
    # keep the newest N rows (ids only grow): bad input cannot fill the disk
    "quarantine_prune": "DELETE FROM quarantine WHERE id <= (SELECT max(id) FROM quarantine) - ?",
    # downstream items, committed with the results they carry (gateway/sinks)
    "sink_outbox": "INSERT INTO sink_outbox (sink, tbl, alert, n, bytes, created_ms, msg_id, body) "
                   "VALUES (?,?,?,?,?,?,?,?)",
}


class Database:
    """One sqlite3 connection owned by one worker thread, awaited from asyncio.

    Threading model (aiosqlite's, with public API only): the connection is created and used
    only in a dedicated single-thread executor, so calls run one at a time in the order they
    were submitted; each call is awaited as a future on the event loop. run(fn, *args) runs
    fn(conn, *args) there: a whole checkpoint transaction is one hop instead of one await per
    statement (each await would wait for the busy event loop to come round, and other tasks
    sharing the connection, sinks and the web view, could slip statements into the open
    transaction between them). aiosqlite offers no public way to run a function in its thread
    (only its private _execute), so the gateway uses the standard library's executor. close() stops
    the thread (a non-daemon thread left running would hang the interpreter at exit)."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgeflow-sqlite")
        self._conn = None

    @classmethod
    async def connect(cls, path, **kwargs):
        db = cls()
        try:
            db._conn = await db._call(functools.partial(sqlite3.connect, path, check_same_thread=False, **kwargs))
        except BaseException:
            db._pool.shutdown(wait=False)
            raise
        return db

    def _call(self, fn, *args):
        return asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def run(self, fn, *args):
        """fn(connection, *args) in the database thread; awaitable."""
        return self._call(fn, self._conn, *args)

    # No cursor ever leaves the database thread: a cursor freed in the event loop's thread resets
    # its statement there, and a connection used from two threads at once can lose the error of
    # the other thread's failing call (sqlite3 raises SystemError "returned NULL without setting
    # an exception", or a wrong error): the connection is used in its own thread only.
    def execute(self, sql, params=()):
        """The number of rows changed (fetch rows with execute_fetchall)."""
        return self._call(_rowcount, self._conn.execute, sql, params)

    def executemany(self, sql, rows):
        return self._call(_rowcount, self._conn.executemany, sql, rows)

    def executescript(self, script):
        return self._call(_rowcount, self._conn.executescript, script)

    def execute_fetchall(self, sql, params=()):
        return self._call(_fetchall, self._conn, sql, params)

    @property
    def in_transaction(self):
        return self._conn is not None and self._conn.in_transaction

    async def close(self):
        conn, self._conn = self._conn, None
        try:
            if conn is not None:
                await self._call(conn.close)
        finally:
            self._pool.shutdown(wait=False)


def _fetchall(conn, sql, params):
    cur = conn.execute(sql, params)
    try:
        return cur.fetchall()
    finally:
        cur.close()


def _rowcount(method, *args):
    cur = method(*args)
    try:
        return cur.rowcount
    finally:
        cur.close()


RAW_COLS = 7  # columns of a raw reading row


class StoreError(sqlite3.DatabaseError):
    """The database cannot be used: corrupt, unreadable, full, replaced. Fatal for the gateway.
    A sqlite3.DatabaseError, so callers that handle SQLite's errors handle it too."""


def _file_id(path):
    st = os.stat(path)
    return st.st_dev, st.st_ino


# Readable data (ops): channel names/units, views in real units with ISO times, and the
# indexes per-device time ranges and retention use. Views are recreated at every start.
_ISO = "strftime('%%Y-%%m-%%dT%%H:%%M:%%fZ', %s / 1000.0, 'unixepoch')"
_NAME = ("coalesce((SELECT name FROM channels c WHERE c.device = {d} AND c.channel = {c}), "
         "(SELECT name FROM channels c WHERE c.device = '*' AND c.channel = {c}), 'ch' || {c})")
_UNIT = ("coalesce((SELECT unit FROM channels c WHERE c.device = {d} AND c.channel = {c}), "
         "(SELECT unit FROM channels c WHERE c.device = '*' AND c.channel = {c}), '')")


def _nu(d, c):
    return "%s AS channel_name, %s AS unit" % (_NAME.format(d=d, c=c), _UNIT.format(d=d, c=c))


READABLE_SCHEMA = """
CREATE TABLE IF NOT EXISTS channels (device TEXT, channel INTEGER, name TEXT, unit TEXT,
    PRIMARY KEY (device, channel));
CREATE INDEX IF NOT EXISTS device_windows_device_t ON device_windows (device, t);
CREATE INDEX IF NOT EXISTS device_status_device_t ON device_status (device, t);
CREATE INDEX IF NOT EXISTS cep_events_t ON cep_events (t);
CREATE INDEX IF NOT EXISTS anomalies_t ON anomalies (t);
CREATE INDEX IF NOT EXISTS late_t ON late (t);
CREATE INDEX IF NOT EXISTS quarantine_received ON quarantine (received_ms);
CREATE INDEX IF NOT EXISTS gaps_t ON gaps (t);
CREATE INDEX IF NOT EXISTS unsynced_device ON unsynced (device, seq);
CREATE INDEX IF NOT EXISTS window_revisions_start ON window_revisions (start);
DROP VIEW IF EXISTS readings_v;
CREATE VIEW readings_v AS SELECT device, %(iso_t)s AS time, channel, %(nu_r)s, value / 1000.0 AS value,
    boot, seq, flags, t FROM readings r;
DROP VIEW IF EXISTS window_results_v;
CREATE VIEW window_results_v AS SELECT scope, key, channel, %(nu_w)s, %(iso_s)s AS start_time,
    %(iso_e)s AS end_time, revision, count, mean / 1000.0 AS mean, min / 1000.0 AS min, max / 1000.0 AS max,
    std / 1000.0 AS std, start, end FROM window_results w;
DROP VIEW IF EXISTS alerts_v;
CREATE VIEW alerts_v AS
    SELECT %(iso_t)s AS time, device, 'cep' AS type, rule AS what, severity, NULL AS channel,
        NULL AS channel_name, NULL AS unit, NULL AS value, evidence AS detail, t FROM cep_events
    UNION ALL
    SELECT %(iso_t)s, device, 'anomaly', CASE detector WHEN 1 THEN 'zscore' WHEN 2 THEN 'ewma'
        ELSE 'detector ' || detector END, NULL, channel, %(nu_a)s, value / 1000.0,
        'score ' || (score / 1000.0) || ', baseline ' || (baseline / 1000.0), t FROM anomalies a;
DROP VIEW IF EXISTS late_v;
CREATE VIEW late_v AS SELECT %(iso_t)s AS time, device, channel, %(nu_l)s, value / 1000.0 AS value, scope, key,
    %(iso_ws)s AS window_start, %(iso_wm)s AS watermark, reason, boot, seq, t FROM late l;
DROP VIEW IF EXISTS quarantine_v;
CREATE VIEW quarantine_v AS SELECT %(iso_rx)s AS received, device, reason, detail, topic, boot, seq,
    length(payload) AS payload_bytes, id FROM quarantine;
DROP VIEW IF EXISTS devices_v;
CREATE VIEW devices_v AS SELECT device, online, %(iso_seen)s AS last_seen, fw, backlog AS backlog_announced,
    outbox_records AS backlog_on_device, received, duplicates, late, quarantined, dropped_by_device,
    outbox_dropped, clock_offset_ms, reconnects, %(iso_st)s AS status_time FROM devices;
""" % {"iso_t": _ISO % "t", "iso_s": _ISO % "start", "iso_e": _ISO % "end", "iso_ws": _ISO % "window_start",
       "iso_wm": _ISO % "watermark", "iso_rx": _ISO % "received_ms", "iso_seen": _ISO % "nullif(last_seen_ms, 0)",
       "iso_st": _ISO % "status_t",
       "nu_r": _nu("r.device", "r.channel"), "nu_w": _nu("CASE w.scope WHEN 'device' THEN w.key ELSE '*' END",
                                                         "w.channel"),
       "nu_a": _nu("a.device", "a.channel"), "nu_l": _nu("l.device", "l.channel")}

VIEWS = ("readings_v", "window_results_v", "alerts_v", "late_v", "quarantine_v", "devices_v")

# A device's raw readings in [:from, :to) through reading_spans (one row per wire message,
# indexed by (device, t_max)): the gateway's raw rows are inserted a message at a time, so
# each message's readings are one rowid range. Works with or without store.index_readings.
READINGS_RANGE = ("SELECT r.* FROM reading_spans s JOIN readings r ON r.rowid BETWEEN s.row_first AND s.row_last "
                  "WHERE s.device = :device AND s.t_max >= :from AND s.t_min < :to AND r.t >= :from AND r.t < :to")

# Retention: (config key, table, time column); deleted in batches of batch_rows per statement.
RETENTION = (
    ("readings_days", "readings", "t"),
    ("results_days", "window_results", "start"), ("results_days", "window_revisions", "start"),
    ("results_days", "device_windows", "t"), ("results_days", "device_status", "t"),
    ("events_days", "cep_events", "t"), ("events_days", "anomalies", "t"), ("events_days", "late", "t"),
    ("events_days", "quarantine", "received_ms"), ("events_days", "gaps", "t"),
)
# tables with an index on (device, t): pruned device by device through it
_PER_DEVICE = ("readings", "device_windows", "device_status")


def prune_sql(table, col, indexed=True):
    """One bounded DELETE. Per-device tables go device by device through their (device, t)
    index (CROSS JOIN keeps devices the outer loop: a seek per device, never a full scan).
    Raw readings without their index (store.index_readings = false): a scan in insertion
    order, which meets the old rows first."""
    if table in _PER_DEVICE and (indexed or table != "readings"):
        return ("DELETE FROM %s WHERE rowid IN (SELECT x.rowid FROM devices d CROSS JOIN %s x "
                "ON x.device = d.device AND x.%s < ? LIMIT ?)" % (table, table, col))
    return "DELETE FROM %s WHERE rowid IN (SELECT rowid FROM %s WHERE %s < ? LIMIT ?)" % (table, table, col)


class Store:
    # commit() may be called again while one is in flight: the database thread runs them in
    # order (a failed one stops the rest). gateway/ckpt.py's replicated store may not.
    pipelined = True

    def __init__(self, path, synchronous="FULL"):
        self.path = path
        self.synchronous = synchronous
        self.db = None
        self.commits = 0
        self.rows_written = 0
        self._file_id = None  # (st_dev, st_ino) of the file opened: a replaced file is detected
        self.pruned = [0]  # quarantine rows deleted to keep its bound
        self.failed = None  # the error of a failed commit: nothing more is written, not even at close
        self._broken = []  # the same, in the database thread (_after_ok)

    async def open(self):
        """Open, check (PRAGMA quick_check) and create the schema. StoreError on any problem,
        with the database thread stopped (a live non-daemon thread would hang the exit)."""
        try:
            d = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(d, exist_ok=True)
            # statements of every multi-row size of every table stay prepared (_parts)
            self.db = await Database.connect(self.path, isolation_level=None, cached_statements=256)
            # no mmap of the database file: an I/O error must be an error, not SIGBUS
            await self.db.execute("PRAGMA mmap_size=0")
            bad = [str(r[0]) for r in await self.db.execute_fetchall("PRAGMA quick_check(3)")]
            if bad != ["ok"]:
                why = " / ".join(" ".join(b.split()) for b in bad)[:300]
                raise StoreError("database %s is corrupt (PRAGMA quick_check: %s); move it aside and restore a "
                                 "backup, or start with an empty file" % (self.path, why))
            await self.db.execute("PRAGMA journal_mode=WAL")
            await self.db.execute("PRAGMA synchronous=%s" % self.synchronous)
            await self.db.run(create_schema)
            self._file_id = _file_id(self.path)
            await self.db.run(fold_journal)  # state tables current before anything reads them
        except BaseException as e:
            await self.close()
            if isinstance(e, (sqlite3.Error, OSError)) and not isinstance(e, StoreError):
                raise StoreError("cannot open database %s: %s" % (self.path, e)) from e
            raise

    async def prepare(self, channels, index_readings=True):
        """Readable schema (views, indexes) and the channel map {(device or '*', ch): (name, unit)}."""
        await self.db.executescript(READABLE_SCHEMA)
        # per-device time ranges of raw readings; costs insert speed (docs/operations.md)
        await self.db.execute("CREATE INDEX IF NOT EXISTS readings_device_t ON readings (device, t)" if index_readings
                              else "DROP INDEX IF EXISTS readings_device_t")
        self.index_readings = index_readings
        await self.db.execute("BEGIN IMMEDIATE")
        await self.db.execute("DELETE FROM channels")
        await self.db.executemany("INSERT INTO channels VALUES (?,?,?,?)",
                                  [(d, c, n, u) for (d, c), (n, u) in sorted(channels.items())])
        await self.db.execute("COMMIT")

    async def prune(self, cutoffs, batch):
        """Retention: delete rows older than cutoffs[key] (epoch ms), at most `batch` rows per
        statement, each statement its own short transaction queued between checkpoints.
        Returns {table: rows deleted}; a table is done when a statement deletes < batch."""
        out = {}
        indexed = getattr(self, "index_readings", True)
        for key, table, col in RETENTION:
            cut = cutoffs.get(key)
            if not cut:
                continue
            sql = prune_sql(table, col, indexed)
            n = 0
            if table == "readings":
                # spans first (a chunk of messages per transaction), then the rows no span covers
                while True:
                    k, more = await self.db.run(_prune_spans, cut, batch)
                    n += k
                    if not more:
                        break
                if not indexed:
                    sql = "DELETE FROM readings WHERE rowid IN (SELECT rowid FROM readings WHERE rowid < %d AND " \
                          "t < ? LIMIT ?)" % (await self.db.run(_first_spanned_row))
            while True:
                k = await self.db.execute(sql, (cut, batch))
                n += k
                if k < batch:
                    break
            if n:
                out[table] = n
        return out

    async def close(self):
        db, self.db = self.db, None
        if db is not None:
            if self._file_id is not None and self.failed is None:
                try:  # leave the state tables current for readers (open folds anyway)
                    if _file_id(self.path) == self._file_id:
                        await db.run(fold_journal)
                except Exception:  # noqa: BLE001 - closing after a failure: the journal stays, open folds it
                    pass
            try:
                await db.close()
            except Exception:  # noqa: BLE001 - closing a broken database: the thread is stopped anyway
                pass

    async def commit(self, writes):
        """writes: list of (sql key, rows). All of it in one transaction; returns rows written.

        The whole transaction is one call into the database thread (Database.run)."""
        try:
            n = await self.db.run(_after_ok, self._broken, writes, self.path, self._file_id, self.pruned)
        except StoreError as e:
            self.failed = e
            raise
        except sqlite3.Error as e:
            self.failed = StoreError("commit to %s failed: %s" % (self.path, e))
            raise self.failed from e
        except BaseException as e:
            self.failed = e
            raise
        self.commits += 1
        self.rows_written += n
        return n

    async def load_state(self):
        db = self.db
        q = db.execute_fetchall
        meta = dict(await q("SELECT k, v FROM meta"))
        return {
            "meta": meta,
            "dedup": await q("SELECT device, boot, hwm, bits FROM dedup"),
            "dedup_devices": dict(await q("SELECT device, min_boot FROM dedup_devices")),
            "device_identity": await q("SELECT device, instance, nonce, retired, reflashes FROM device_identity"),
            "watermarks": await q("SELECT device, max_t, online FROM device_watermarks"),
            "devices": await q("SELECT * FROM devices"),
            "open_windows": await q("SELECT scope, key, channel, start, count, sum, sumsq, min, max, revision "
                                    "FROM open_windows"),
        }

    def size_bytes(self):
        total = 0
        for suffix in ("", "-wal"):
            try:
                total += os.path.getsize(self.path + suffix)
            except OSError:
                pass
        return total


# Big batches go in as multi-row INSERTs of CHUNK rows: sqlite3 releases and retakes
# the GIL around every statement step, and with the event loop busy on the other
# core each retake can wait for a GIL switch interval; 500 rows per step cut that 500x.
CHUNK = 500
_MULTI = {}


def _multi_sql(sql, k=CHUNK):
    m = _MULTI.get((sql, k))
    if m is None:
        head, _, one = sql.partition(" VALUES ")
        m = _MULTI[(sql, k)] = head + " VALUES " + ",".join([one] * k)
    return m


def _parts(n):
    """[(rows per statement, statements)] of the multi-row INSERTs for n rows: CHUNK rows each,
    then the rest in powers of two (at most 9 statements more, of sizes the statement cache
    keeps) instead of row by row: each statement releases and retakes the GIL, and the rest
    alone (250 rows on average, twice per checkpoint for the window results) cost the
    database thread more waiting than all the rest of a commit (issue 16)."""
    full, rest = divmod(n, CHUNK)
    out = [(CHUNK, full)] if full else []
    k = 256
    while rest:
        if rest >= k:
            out.append((k, 1))
            rest -= k
        k >>= 1
    return out


def _insert(conn, sql, rows):
    if not (sql.startswith("INSERT") and " VALUES (" in sql):
        conn.executemany(sql, rows)
        return
    i = 0
    for k, times in _parts(len(rows)):
        if k == 1:
            conn.execute(sql, rows[i])
        else:
            conn.executemany(_multi_sql(sql, k), (tuple(chain.from_iterable(rows[j:j + k]))
                                                  for j in range(i, i + k * times, k)))
        i += k * times


# A fold's deletes and device updates as multi-row statements too (_parts), not one statement
# (one GIL round trip) per row: a fold deletes the windows purged in the last second and
# updates every device's counters (UPDATE ... FROM needs SQLite 3.33; before, row by row).
_MANY = {"devices_hot": ("UPDATE devices SET %s FROM (VALUES %%s) AS v WHERE devices.device = v.column12" % ", ".join(
             "%s = v.column%d" % (c, i + 1) for i, c in enumerate(
                 ("last_seen_ms", "received", "duplicates", "dropped_by_device", "skipped_by_hello", "quarantined",
                  "late", "unsynced", "deferred", "live", "backlog_received"))), 12),
         "open_windows_del": ("WITH v(a, b, c, d) AS (VALUES %s) DELETE FROM open_windows "
                              "WHERE (scope, key, channel, start) IN (SELECT a, b, c, d FROM v)", 4),
         "dedup_del": ("WITH v(a, b) AS (VALUES %s) DELETE FROM dedup WHERE (device, boot) IN (SELECT a, b FROM v)", 2)}
_MANY_OK = sqlite3.sqlite_version_info >= (3, 33, 0)


def _many(conn, key, rows):
    """rows of SQL[key] (devices_hot, open_windows_del, dedup_del), in multi-row statements."""
    if not rows:
        return
    if not _MANY_OK:
        conn.executemany(SQL[key], rows)
        return
    tmpl, cols = _MANY[key]
    one = "(" + ",".join("?" * cols) + ")"
    i = 0
    for k, times in _parts(len(rows)):
        sql = _MULTI.get((key, k))
        if sql is None:
            sql = _MULTI[(key, k)] = tmpl % ",".join([one] * k)
        conn.executemany(sql, (tuple(chain.from_iterable(rows[j:j + k])) for j in range(i, i + k * times, k)))
        i += k * times


def _insert_flat(conn, sql, flat, cols):
    """Rows given as one flat list of `cols` values each: multi-row INSERTs straight from
    slices (_parts). Returns the rows inserted."""
    i = 0
    for k, times in _parts(len(flat) // cols):
        step = k * cols
        conn.executemany(_multi_sql(sql, k), (tuple(flat[j:j + step]) for j in range(i, i + step * times, step)))
        i += step * times
    return len(flat) // cols


def _after_ok(conn, broken, *args):
    """_transaction(conn, *args) in the database thread unless a commit before it failed there:
    commits may be queued behind one in flight (Store.pipelined) and each holds only the state
    changed since the one before, so none may commit after one failed."""
    if broken:
        raise StoreError("not committed: a commit before it failed (%r)" % (broken[0],))
    try:
        return _transaction(conn, *args)
    except BaseException as e:
        broken.append(e)
        raise


def _check_same_file(path, file_id):
    """A commit into a file that was deleted or replaced since open is lost at the next
    restart: it must not be acked. Checked after COMMIT, before the caller acks."""
    try:
        same = _file_id(path) == file_id
    except OSError as e:
        raise StoreError("database file %s is gone (%s): stopping, nothing more is acked" % (path, e)) from e
    if not same:
        raise StoreError("database file %s was replaced under the gateway: stopping, nothing more is acked" % path)


def _prune_spans(conn, cut, batch):
    """One transaction: delete the readings of spans that end before cut, about `batch`
    rows, and their spans. Returns (rows deleted, more to do)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        spans = conn.execute("SELECT rowid, row_first, row_last FROM reading_spans WHERE t_max < ? LIMIT ?",
                             (cut, max(1, batch // 50))).fetchall()
        n = 0
        for _r, a, b in spans:
            n += conn.execute("DELETE FROM readings WHERE rowid BETWEEN ? AND ?", (a, b)).rowcount
        conn.executemany("DELETE FROM reading_spans WHERE rowid = ?", [(r,) for r, _a, _b in spans])
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return n, len(spans) == max(1, batch // 50)


def _first_spanned_row(conn):
    """Rows below the oldest span's first row have no span (written by hand or before spans
    existed); spans are in insertion order, so the oldest span has the lowest rowids."""
    r = conn.execute("SELECT row_first FROM reading_spans ORDER BY rowid LIMIT 1").fetchone()
    if r is None:
        r = conn.execute("SELECT max(rowid) + 1 FROM readings").fetchone()
    return int(r[0] or 1)


def _transaction(conn, writes, path=None, file_id=None, pruned=None):
    """Runs in the worker thread: BEGIN, batched inserts per table, COMMIT. pruned[0] counts
    quarantine rows deleted. Spans carry row offsets into this checkpoint's readings: SQLite
    gives inserted rows max(rowid) + 1, + 2, ... (its documented rowid choice), so they become
    rowids here."""
    pruned = [0] if pruned is None else pruned
    n = 0
    base = 0
    conn.execute("BEGIN IMMEDIATE")
    try:
        for key, rows in writes:
            if rows:
                if key == "quarantine_prune":
                    pruned[0] += conn.execute(SQL[key], rows[0]).rowcount
                    continue
                if key == "state_fold":  # [()]: fold what the table holds; [FoldMerge.rows()]: that
                    n += _fold(conn, rows[0] or None)
                    continue
                if key in ("readings", "readings_flat"):
                    base = (conn.execute("SELECT max(rowid) FROM readings").fetchone()[0] or 0) + 1
                if key == "readings_flat":
                    n += _insert_flat(conn, SQL[key], rows, RAW_COLS)
                    continue
                if key == "reading_spans":
                    rows = [(d, b, s0, s1, t0, t1, base + o, base + o + c - 1) for d, b, s0, s1, t0, t1, o, c in rows]
                _insert(conn, SQL[key], rows)
                n += len(rows)
        conn.execute("COMMIT")
    except BaseException:
        # SQLite may have rolled back already (SQLITE_FULL, I/O errors): a second ROLLBACK
        # would raise 'no transaction is active' and hide the real error
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
        raise
    if file_id is not None:
        _check_same_file(path, file_id)
    return n


def since_fold(f_up, f_del, upserted, deleted):
    """Add one export's upserted and deleted keys to the keys changed since the last fold
    (f_up, f_del: sets; each key ends in one of them, by its last op; a fold applies a
    checkpoint's upserts, then its deletes). The running gateway's fold writes these keys' rows
    as the state holds them (Gateway._fold_rows)."""
    f_up.update(upserted)
    if f_del:  # tested first: a pass over the keys hashes each of them
        f_del.difference_update(upserted)
    if deleted:
        f_up.difference_update(deleted)
        f_del.update(deleted)


class FoldMerge:
    """State journal entries merged: each key once, its latest row (a later delete wins over an
    earlier upsert and the reverse; a device's hot columns over its older full row). _fold merges
    the journal rows it reads back; the gateway merges each checkpoint's state as it commits it
    and hands rows() to the fold (write key "state_fold"), which then decodes nothing."""

    __slots__ = ("full", "hot", "merged")

    def __init__(self):
        self.full, self.hot = {}, {}  # devices: whole rows, then the hot columns of newer changes
        self.merged = {k: {} for k in _KEYED}

    def add(self, journal):
        """journal: [(key, rows)] of JOURNALED keys, one checkpoint's (oldest first)."""
        full, hot, merged = self.full, self.hot, self.merged
        for key, rows in journal:
            if not rows:
                continue
            if key == "devices":
                for r in rows:
                    full[r[0]] = r
                    hot.pop(r[0], None)
            elif key == "devices_hot":
                for r in rows:
                    hot[r[-1]] = r  # the device is the last column
            elif key == "windows":
                m = merged["open_windows"]
                for scope, ups, gone in rows:
                    for k, st in ups.items():
                        m[(scope,) + k] = open_window_row(scope, k, st)
                    for k in gone:
                        m[(scope,) + k] = None
            elif key in _KEYED:
                m, kl = merged[key], _KEYED[key][1]
                for r in rows:
                    m[tuple(r[:kl])] = r
            else:
                m = merged[_DELETES[key]]
                for r in rows:
                    m[tuple(r)] = None

    def rows(self):
        """(full device rows, hot device rows, [(key, deletes, upserts)]): plain lists, so a
        replica (gateway/ckpt.py) can be sent the same fold."""
        groups = []
        for key in _KEYED:
            m = self.merged[key]
            groups.append((key, [k for k, r in m.items() if r is None], [r for r in m.values() if r is not None]))
        return list(self.full.values()), list(self.hot.values()), groups


def _fold(conn, rows=None):
    """Apply the state journal to the state tables and empty it. Inside a transaction. rows:
    FoldMerge.rows() of every journal entry in the table (the running gateway's), else the
    entries are read and merged here. Returns the rows written."""
    if rows is None:
        entries = conn.execute("SELECT id, body FROM state_journal ORDER BY id").fetchall()
        if not entries:
            return 0
        fm = FoldMerge()
        for _id, body in entries:
            try:
                # marshal: the gateway's own rows, folded within about a second and at every close;
                # newer Pythons read older marshal versions (a crash, then an upgrade, still folds)
                journal = marshal.loads(body)
            except (ValueError, EOFError, TypeError) as e:
                raise sqlite3.DatabaseError("state journal row %d is unreadable (%s): the file is damaged" % (_id, e))
            fm.add(journal)
        rows = fm.rows()
    full, hot, groups = rows
    n = len(full) + len(hot)
    _insert(conn, SQL["devices"], full)
    _many(conn, "devices_hot", hot)
    for key, dels, ups in groups:
        _many(conn, _KEYED[key][0], dels)
        _insert(conn, SQL[key], ups)
        n += len(dels) + len(ups)
    conn.execute("DELETE FROM state_journal")
    return n


def create_schema(conn):
    """The tables and the schema version (what open() makes; a rebuilt replica makes the same)."""
    conn.executescript(SCHEMA)
    conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))


def fold_journal(conn):
    """Bring the state tables up to date from the state journal, in a transaction of its own
    (conn: a sqlite3 connection in autocommit mode, isolation_level=None)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        _fold(conn)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def now_ms():
    return int(time.time() * 1000)
