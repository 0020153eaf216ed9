"""SQLite store: the schema, one transaction per checkpoint, and state restore.

Journal WAL. synchronous=FULL by default: a device deletes a record once it is
acked, and acks follow the commit, so a commit must survive power loss, not
only a crash of the process (NORMAL in WAL mode can lose the last commits on
power loss). FULL costs one fsync per checkpoint (~0.2 ms here, a few ms on an
SD card), negligible at a few checkpoints per second.
"""
import os
import time
from itertools import chain

import aiosqlite

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v);
CREATE TABLE IF NOT EXISTS readings (device TEXT, boot INTEGER, seq INTEGER, t INTEGER, channel INTEGER,
    flags INTEGER, value INTEGER);
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
    device_late INTEGER, clock_offset_ms INTEGER, free_mem INTEGER, reconnects INTEGER);
CREATE TABLE IF NOT EXISTS dedup (device TEXT, boot INTEGER, hwm INTEGER, bits BLOB,
    PRIMARY KEY (device, boot));
CREATE TABLE IF NOT EXISTS dedup_devices (device TEXT PRIMARY KEY, min_boot INTEGER);
CREATE TABLE IF NOT EXISTS device_watermarks (device TEXT PRIMARY KEY, max_t INTEGER, online INTEGER);
CREATE TABLE IF NOT EXISTS open_windows (scope TEXT, key TEXT, channel INTEGER, start INTEGER, count INTEGER,
    sum INTEGER, sumsq TEXT, min INTEGER, max INTEGER, revision INTEGER,
    PRIMARY KEY (scope, key, channel, start));
CREATE TABLE IF NOT EXISTS sink_outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, sink TEXT, tbl TEXT,
    alert INTEGER, n INTEGER, bytes INTEGER, created_ms INTEGER, msg_id TEXT, body BLOB);
CREATE INDEX IF NOT EXISTS sink_outbox_sink ON sink_outbox (sink, id);
CREATE INDEX IF NOT EXISTS window_results_start ON window_results (start);
"""

# Output tables (what a user queries / exports) and the state tables beside them.
OUTPUT_TABLES = ("readings", "unsynced", "device_windows", "cep_events", "anomalies", "device_status", "gaps",
                 "window_results", "window_revisions", "late", "quarantine", "devices")
STATE_TABLES = ("dedup", "dedup_devices", "device_watermarks", "open_windows", "meta")

_WINDOW_COLS = "scope, key, channel, start, end, revision, count, sum, min, max, mean, std, watermark"

# Insert statements, in the order a checkpoint applies them.
SQL = {
    "readings": "INSERT INTO readings VALUES (?,?,?,?,?,?,?)",
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
    "dedup": "INSERT OR REPLACE INTO dedup VALUES (?,?,?,?)",
    "dedup_del": "DELETE FROM dedup WHERE device = ? AND boot = ?",
    "dedup_devices": "INSERT OR REPLACE INTO dedup_devices VALUES (?,?)",
    "device_watermarks": "INSERT OR REPLACE INTO device_watermarks VALUES (?,?,?)",
    "open_windows": "INSERT OR REPLACE INTO open_windows VALUES (?,?,?,?,?,?,?,?,?,?)",
    "open_windows_del": "DELETE FROM open_windows WHERE scope = ? AND key = ? AND channel = ? AND start = ?",
    "meta": "INSERT OR REPLACE INTO meta VALUES (?,?)",
    # downstream items, committed with the results they carry (gateway/sinks)
    "sink_outbox": "INSERT INTO sink_outbox (sink, tbl, alert, n, bytes, created_ms, msg_id, body) "
                   "VALUES (?,?,?,?,?,?,?,?)",
}


class Store:
    def __init__(self, path, synchronous="FULL"):
        self.path = path
        self.synchronous = synchronous
        self.db = None
        self.commits = 0
        self.rows_written = 0

    async def open(self):
        d = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(d, exist_ok=True)
        self.db = await aiosqlite.connect(self.path, isolation_level=None)
        await self.db.execute("PRAGMA journal_mode=WAL")
        await self.db.execute("PRAGMA synchronous=%s" % self.synchronous)
        await self.db.executescript(SCHEMA)
        await self.db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))

    async def close(self):
        if self.db is not None:
            await self.db.close()
            self.db = None

    async def commit(self, writes):
        """writes: list of (sql key, rows). All of it in one transaction; returns rows written.

        The whole transaction is one call into aiosqlite's worker thread: one await per
        statement would wait for the busy event loop to come round between statements."""
        run = getattr(self.db, "_execute", None)
        if run is not None:
            n = await run(_transaction, self.db._conn, writes)
        else:  # an aiosqlite without _execute: one await per table, same transaction
            n = await self._commit_stepwise(writes)
        self.commits += 1
        self.rows_written += n
        return n

    async def _commit_stepwise(self, writes):
        db = self.db
        n = 0
        await db.execute("BEGIN IMMEDIATE")
        try:
            for key, rows in writes:
                if rows:
                    await db.executemany(SQL[key], rows)
                    n += len(rows)
            await db.execute("COMMIT")
        except BaseException:
            try:
                await db.execute("ROLLBACK")
            except Exception:
                pass
            raise
        return n

    async def load_state(self):
        db = self.db
        q = db.execute_fetchall
        meta = dict(await q("SELECT k, v FROM meta"))
        return {
            "meta": meta,
            "dedup": await q("SELECT device, boot, hwm, bits FROM dedup"),
            "dedup_devices": dict(await q("SELECT device, min_boot FROM dedup_devices")),
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


def _multi_sql(sql):
    m = _MULTI.get(sql)
    if m is None:
        head, _, one = sql.partition(" VALUES ")
        m = _MULTI[sql] = head + " VALUES " + ",".join([one] * CHUNK)
    return m


def _insert(conn, sql, rows):
    n = len(rows)
    if n >= CHUNK and sql.startswith("INSERT") and " VALUES (" in sql:
        full = n - n % CHUNK
        conn.executemany(_multi_sql(sql), [tuple(chain.from_iterable(rows[i:i + CHUNK]))
                                           for i in range(0, full, CHUNK)])
        rows = rows[full:]
    if rows:
        conn.executemany(sql, rows)


def _transaction(conn, writes):
    """Runs in the worker thread: BEGIN, batched inserts per table, COMMIT."""
    n = 0
    conn.execute("BEGIN IMMEDIATE")
    try:
        for key, rows in writes:
            if rows:
                _insert(conn, SQL[key], rows)
                n += len(rows)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return n


def now_ms():
    return int(time.time() * 1000)
