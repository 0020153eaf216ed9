"""Merge stage for a partitioned site: partition databases -> one site database.

    python -m gateway.merge --out site.db /var/lib/edgeflow/part-*.db

Each partition's pipeline computes group windows over its own devices only: partial
aggregates (count, sum, sum of squares, min, max) fired by the partition's watermark (the
minimum over its active devices). The site's group windows are the combination of the
partials, and the site's watermark is the minimum of the partitions' watermarks, which is
the minimum over all active devices: the same global watermark one gateway would keep for
the whole fleet (partitions with no active device have none and do not hold it back).
A merged group window fires (revision 0, then one revision per amendment of any partial)
when that minimum reaches end - 1; before that it is open. Everything per device (readings,
device windows, late rows, quarantine, ...) is copied: devices never span partitions.

Where the result can differ from one gateway's: a partition's watermark leads the site's,
so a record that is late by more than allowed_lateness for its partition (but not for the
site) goes to the late table instead of its group window. With a lateness above the
devices' spread in event time (the default) the results are equal, which
tests/test_scaleout.py checks against a single gateway on the same input.

Sums of squares of fired partials are recovered exactly from (count, sum, std) when
n*std fits a double's exact range (the fixed-point values of the readings do); windows
still open carry their exact sumsq.
"""
import argparse
import math
import sqlite3
import sys

from .config import Config
from .store import SCHEMA

_COPY = ("readings", "unsynced", "device_windows", "cep_events", "anomalies", "device_status", "gaps", "late",
         "devices")


def _sumsq(n, s, std):
    return round(((n * std) ** 2 + s * s) / n) if n else 0


def _result(n, s, sq):
    var = n * sq - s * s
    return s / n, (math.sqrt(var) / n if var > 0 else 0.0)


class MergeError(Exception):
    pass


def _journal_rows(db):
    """Rows of the state journal (store.py): state the tables alone do not show yet."""
    try:
        return db.execute("SELECT count(*) FROM state_journal").fetchone()[0]
    except sqlite3.OperationalError:  # a file made before the journal existed
        return 0


def merge(part_paths, out_path, size_ms):
    """size_ms: the windows' size (the same on every gateway). Writes the site database;
    returns {'watermark', 'group_fired', 'group_open', 'partitions'}."""
    out = sqlite3.connect(out_path)
    out.executescript(SCHEMA)
    # copied raw readings have no reading_spans (store.py): index them row by row instead
    out.execute("CREATE INDEX IF NOT EXISTS readings_device_t ON readings (device, t)")
    for t in _COPY + ("window_results", "window_revisions", "open_windows", "quarantine"):
        out.execute("DELETE FROM %s" % t)
    partials = {}  # (key, ch, start) -> [[n, s, sq, mn, mx, rev], ...]
    wms = []
    for path in part_paths:
        db = sqlite3.connect("file:%s?mode=ro" % path, uri=True)
        if _journal_rows(db):
            db.close()
            raise MergeError("%s holds state not yet folded into its tables (its gateway was killed): open it "
                             "once with the gateway (or edgeflow-scaleout --rebuild-to), or fold it with the "
                             "command in docs/gateway.md (The state journal), then merge" % path)
        for t in _COPY:
            cols = [r[1] for r in db.execute("PRAGMA table_info(%s)" % t)]
            rows = db.execute("SELECT %s FROM %s" % (", ".join(cols), t)).fetchall()
            if rows:
                out.executemany("INSERT OR REPLACE INTO %s (%s) VALUES (%s)" % (t, ", ".join(cols),
                                ", ".join("?" * len(cols))), rows)
        qcols = "received_ms, topic, device, boot, seq, reason, detail, payload, digest"
        out.executemany("INSERT OR IGNORE INTO quarantine (%s) VALUES (?,?,?,?,?,?,?,?,?)" % qcols,
                        db.execute("SELECT %s FROM quarantine" % qcols).fetchall())
        for tbl in ("window_results", "window_revisions"):
            out.executemany("INSERT INTO %s SELECT ?,?,?,?,?,?,?,?,?,?,?,?,?" % tbl, db.execute(
                "SELECT * FROM %s WHERE scope = 'device'" % tbl).fetchall())
        out.executemany("INSERT INTO open_windows VALUES (?,?,?,?,?,?,?,?,?,?)",
                        db.execute("SELECT * FROM open_windows WHERE scope = 'device'").fetchall())
        mine = {}
        for key, ch, start, n, s, mn, mx, std, rev in db.execute(
                "SELECT key, channel, start, count, sum, min, max, std, revision FROM window_results "
                "WHERE scope = 'group'"):
            mine[(key, ch, start)] = [n, s, _sumsq(n, s, std), mn, mx, rev]
        for key, ch, start, n, s, sq, mn, mx, rev in db.execute(
                "SELECT key, channel, start, count, sum, sumsq, min, max, revision FROM open_windows "
                "WHERE scope = 'group'"):
            mine[(key, ch, start)] = [n, s, int(sq), mn, mx, rev]  # exact, and current
        for k, v in mine.items():
            partials.setdefault(k, []).append(v)
        row = db.execute("SELECT v FROM meta WHERE k = 'global_watermark'").fetchone()
        if row is not None and row[0] is not None:
            wms.append(int(row[0]))
        db.close()
    wm = min(wms) if wms else None
    size = size_ms
    fired = opened = 0
    for (key, ch, start), parts in sorted(partials.items()):
        n = sum(p[0] for p in parts)
        s = sum(p[1] for p in parts)
        sq = sum(p[2] for p in parts)
        mn = min(p[3] for p in parts)
        mx = max(p[4] for p in parts)
        rev = sum(max(p[5], 0) for p in parts)
        end = start + size
        if wm is not None and wm >= end - 1:
            mean, std = _result(n, s, sq)
            row = ("group", key, ch, start, end, rev, n, s, mn, mx, mean, std, wm)
            out.execute("INSERT INTO window_results VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", row)
            out.execute("INSERT INTO window_revisions VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", row)
            fired += 1
        else:
            out.execute("INSERT INTO open_windows VALUES (?,?,?,?,?,?,?,?,?,?)",
                        ("group", key, ch, start, n, s, str(sq), mn, mx, -1))
            opened += 1
    out.execute("INSERT OR REPLACE INTO meta (k, v) VALUES ('global_watermark', ?)", (wm,))
    # a merged group window has one revision row (numbered by the sum of the partials' revisions)
    out.execute("INSERT OR REPLACE INTO meta (k, v) VALUES ('merged_partitions', ?)", (len(part_paths),))
    out.commit()
    out.close()
    return {"watermark": wm, "group_fired": fired, "group_open": opened, "partitions": len(part_paths)}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="edgeflow-merge", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="site database to write (its tables are replaced)")
    ap.add_argument("-c", "--config", help="the gateways' TOML (for windows.size_ms)")
    ap.add_argument("parts", nargs="+", help="partition databases (part-*.db)")
    args = ap.parse_args(argv)
    try:
        print(merge(args.parts, args.out, Config.load(args.config).windows.size_ms))
    except MergeError as e:
        print("edgeflow-merge: %s" % e, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
