"""Ground-truth checker: the gateway's SQLite against what the devices really stored.

    python -m tools.groundtruth --db var/demo/edgeflow.db --truth var/demo/truth.db
    from tools.groundtruth import check; rep = check(db, [truth], windows); assert rep.ok, rep.text()

What is owed (tools/fleet.py records it): every record that reached a device's flash, i.e.
every complete, CRC-valid outbox frame written to a segment. A record lost with the RAM
batch in a power cut never reached flash and is not owed; a torn frame is not complete
and is not owed (the device's own scan drops it too).

Checks, each difference is an error (exit status 1):
1. Identity. Every owed (device, boot, seq) is in the gateway exactly once, in the table
   of its kind: readings (or `unsynced` for readings still flagged FLAG_UNSYNCED, or
   `quarantine` with the reason), device_windows, cep_events, anomalies, device_status,
   gaps (gap records). Otherwise it must be covered by a gap record (dropped by the
   device's full-outbox policy, reported) or still held on the device's flash, unacked,
   when the run ended ("held", listed, not an error unless --strict-held). Anything in the
   gateway that no device stored is an error ("unexpected"), as is any identity counted
   twice ("duplicated").
2. Content. Reading channel and value equal the stored ones; kind matches the table. Event
   time: a record stored synced carries the same t; one stored unsynced is either still
   unsynced with the same ms-since-boot, or converted at send time with one of the clock
   mappings (boot_epoch) that device boot really had.
3. Gaps. Every range in the gateway's gaps table was reported by that device's gap records.
4. Windows. From the checked readings, recompute every event-time tumbling window of the
   gateway's config (device scope per device and channel; group scope over the group's
   devices), leaving out the records the gateway put in its late table for that scope. The
   aggregate (count, sum, min, max, and mean/std of fired results) must equal the latest
   revision in window_results, or the open state in open_windows for windows not fired
   yet. window_revisions must hold revisions 0..R of each fired window, each a consistent
   step towards revision R (count growing, min/max within R's, mean = sum / count), and R
   equal to the window_results row. Every late row must really be late under the stored watermark
   (end - 1 + allowed_lateness <= watermark) and refer to a checked reading.
"""
import argparse
import collections
import json
import math
import sqlite3
import sys

KIND_READING, KIND_WINDOW, KIND_CEP, KIND_ANOMALY, KIND_STATUS, KIND_GAP = 1, 2, 3, 4, 5, 6
FLAG_UNSYNCED = 1
KIND_TABLE = {KIND_WINDOW: "device_windows", KIND_CEP: "cep_events", KIND_ANOMALY: "anomalies",
              KIND_STATUS: "device_status", KIND_GAP: "gaps"}
NAMES = {1: "reading", 2: "window", 3: "cep", 4: "anomaly", 5: "status", 6: "gap"}


class Report:
    def __init__(self):
        self.counts = collections.OrderedDict()
        self.errors = collections.OrderedDict()  # category -> [examples]
        self.nerr = collections.Counter()
        self.notes = []

    def err(self, cat, example):
        self.nerr[cat] += 1
        ex = self.errors.setdefault(cat, [])
        if len(ex) < 5:
            ex.append(example)

    @property
    def ok(self):
        return not self.nerr

    def text(self):
        c = self.counts
        lines = ["ground truth check: %s" % ("OK" if self.ok else "FAILED")]
        lines.append("  records stored on device flash (owed): %d  (%s)" % (
            c.get("owed", 0), ", ".join("%s %d" % kv for kv in c.get("owed_by_kind", {}).items())))
        lines.append("  delivered exactly once: %d   lost: %d   duplicated: %d   unexpected: %d" % (
            c.get("delivered", 0), self.nerr.get("lost", 0), self.nerr.get("duplicated", 0),
            self.nerr.get("unexpected", 0)))
        lines.append("  dropped by device policy, reported as gaps: %d   still held on devices (unacked): %d" % (
            c.get("gap_covered", 0), c.get("held", 0)))
        lines.append("  unsynced: %d   quarantined: %d   late (side output): %d" % (
            c.get("unsynced", 0), c.get("quarantined", 0), c.get("late_rows", 0)))
        lines.append("  windows: %d checked (%d fired results, %d open), mismatched: %d" % (
            c.get("windows", 0), c.get("windows_fired", 0), c.get("windows_open", 0),
            self.nerr.get("window_mismatch", 0) + self.nerr.get("window_missing", 0)
            + self.nerr.get("window_extra", 0)))
        for n in self.notes:
            lines.append("  note: " + n)
        for cat, ex in self.errors.items():
            lines.append("  ERROR %s: %d, e.g. %s" % (cat, self.nerr[cat], "; ".join(str(e) for e in ex)))
        return "\n".join(lines)


def load_truth(paths):
    recs, epochs, held, meta = {}, collections.defaultdict(set), set(), {}
    for p in paths:
        db = sqlite3.connect("file:%s?mode=ro" % p, uri=True)
        for r in db.execute("SELECT device, boot, seq, kind, t, flags, channel, value, extra FROM records"):
            recs[(r[0], r[1], r[2])] = r[3:]
        for dev, boot, be in db.execute("SELECT device, boot, boot_epoch FROM epochs"):
            epochs[(dev, boot)].add(be)
        held.update(db.execute("SELECT device, boot, seq FROM held"))
        for k, v in db.execute("SELECT k, v FROM meta"):
            meta[k] = json.loads(v)
        db.close()
    return recs, epochs, held, meta


def _start(t, size, offset):
    return t - (t - offset) % size



def _check_revisions(q, got, rep, merged=False):
    """window_revisions holds every revision of every fired window. Their inputs are not known
    here, but the history must be revisions 0..R, each a consistent step towards the latest
    (count growing, min/max within the latest's, mean = sum / count), and revision R must be the
    row in window_results."""
    hist = collections.defaultdict(list)
    for scope, key, ch, start, end, rev, n, s, mn, mx, mean, std in q(
            "SELECT scope, key, channel, start, end, revision, count, sum, min, max, mean, std FROM window_revisions"
            " ORDER BY scope, key, channel, start, revision"):
        hist[(scope, key, ch, start)].append((n, s, mn, mx, mean, std, rev, end))
    for wk, g in got.items():
        rows = hist.pop(wk, [])
        if merged and wk[0] == "group":
            if rows != [g]:  # gateway/merge.py writes only the merged latest revision
                rep.err("window_mismatch", (wk, "merged revision differs from window_results", rows, g))
            continue
        if [r[6] for r in rows] != list(range(g[6] + 1)):
            rep.err("window_mismatch", (wk, "revision history", [r[6] for r in rows], "latest", g[6]))
            continue
        if rows[-1] != g:
            rep.err("window_mismatch", (wk, "latest revision differs from window_results", rows[-1], g))
            continue
        for r, nxt in zip(rows, rows[1:]):
            n, s, mn, mx, mean = r[:5]
            if not (0 < n < nxt[0] and mn >= g[2] and mx <= g[3]
                    and math.isclose(mean, s / n, rel_tol=1e-9, abs_tol=1e-9)):
                rep.err("window_mismatch", (wk, "revision %d is not a step towards revision %d" % (r[6], g[6]), r))
                break
    for wk, rows in hist.items():
        rep.err("window_extra", (wk, "revisions without a result", [r[6] for r in rows]))

def check(db_path, truth_paths, windows=None, strict_held=False):
    """windows: {size_ms, offset_ms, allowed_lateness_ms, groups: [{name, devices, channel}]};
    default: what the truth file's meta says."""
    rep = Report()
    truth, epochs, held, meta = load_truth(truth_paths)
    windows = windows or meta.get("windows")
    db = sqlite3.connect("file:%s?mode=ro" % db_path, uri=True)
    q = db.execute
    devices = set(meta.get("devices") or {k[0] for k in truth})

    seen = collections.Counter()  # identity -> times present in the gateway
    where = {}  # identity -> (table, row)
    readings = {}  # identity -> (t, channel, value)

    def note(key, table, row):
        seen[key] += 1
        if seen[key] == 1:
            where[key] = (table, row)

    for dev, boot, seq, t, ch, fl, v in q("SELECT device, boot, seq, t, channel, flags, value FROM readings"):
        note((dev, boot, seq), "readings", (t, ch, fl, v))
    for dev, boot, seq, t, kind, ch, fl, v in q(
            "SELECT device, boot, seq, t_since_boot_ms, kind, channel, flags, value FROM unsynced"):
        note((dev, boot, seq), "unsynced", (t, ch, fl, v, kind))
    for table in ("device_windows", "cep_events", "anomalies", "device_status"):
        for dev, boot, seq, t, fl in q("SELECT device, boot, seq, t, flags FROM %s" % table):
            note((dev, boot, seq), table, (t, fl))
    for dev, boot, seq, t in q("SELECT DISTINCT device, boot, seq, t FROM gaps"):
        note((dev, boot, seq), "gaps", (t, 0))
    quarantined = 0
    for dev, boot, seq, reason in q("SELECT device, boot, seq, reason FROM quarantine WHERE seq IS NOT NULL"):
        note((dev, boot, seq), "quarantine", (reason,))
        quarantined += 1
    other_q = q("SELECT count(*) FROM quarantine WHERE seq IS NULL AND (device IS NULL OR device IN (%s))"
                % ",".join("?" * len(devices)), sorted(devices)).fetchone()[0] if devices else 0
    if other_q:
        rep.notes.append("%d whole messages quarantined (no record identity)" % other_q)
        for r in q("SELECT reason, detail, topic FROM quarantine WHERE seq IS NULL LIMIT 3"):
            rep.notes.append("  quarantine: %s %s %s" % r)

    # gap coverage reported by the gateway, and what the devices' gap records said
    covered = set()
    for dev, gboot, first, length in q("SELECT DISTINCT device, gap_boot, first_seq, length FROM gaps"):
        for s in range(first, first + length):
            covered.add((dev, gboot, s))
    reported = set()
    for key, r in truth.items():
        if r[0] == KIND_GAP and r[5]:
            gboot, ranges = json.loads(r[5])
            for first, length in ranges:
                for s in range(first, first + length):
                    reported.add((key[0], gboot, s))
    bad_gaps = covered - reported
    for k in sorted(bad_gaps)[:5]:
        rep.err("gap_not_reported_by_device", k)
    if len(bad_gaps) > 5:
        rep.nerr["gap_not_reported_by_device"] += len(bad_gaps) - 5

    # 1. identity
    by_kind = collections.Counter()
    gap_by_kind = collections.Counter()
    delivered = gap_cov = nheld = unsynced = 0
    for key, (kind, t, fl, ch, v, _extra) in truth.items():
        by_kind[NAMES.get(kind, str(kind))] += 1
        n = seen.get(key, 0)
        if n == 0:
            if key in covered:
                gap_cov += 1
                gap_by_kind[NAMES.get(kind, str(kind))] += 1
            elif key in held:
                nheld += 1
                if strict_held:
                    rep.err("held", key)
            else:
                rep.err("lost", key + (NAMES.get(kind),))
            continue
        if n > 1:
            rep.err("duplicated", key + (n,))
        delivered += 1
        table, row = where[key]
        # 2. content
        if table == "quarantine":
            continue
        if kind == KIND_READING:
            if table == "readings":
                gt, gch, gfl, gv = row
                if (gch, gv) != (ch, v):
                    rep.err("value_mismatch", (key, (ch, v), (gch, gv)))
                if fl & FLAG_UNSYNCED:
                    if gt - t not in epochs.get((key[0], key[1]), ()):
                        rep.err("time_mismatch", (key, "unsynced t=%d converted to %d" % (t, gt)))
                elif gt != t:
                    rep.err("time_mismatch", (key, t, gt))
                readings[key] = (gt, ch, v)
            elif table == "unsynced":
                unsynced += 1
                gt, gch, gfl, gv, gkind = row
                if (gch, gv, gt) != (ch, v, t) or not fl & FLAG_UNSYNCED:
                    rep.err("value_mismatch", (key, (t, ch, v, fl), (gt, gch, gv, gfl)))
            else:
                rep.err("wrong_table", (key, "reading", table))
        else:
            want = KIND_TABLE.get(kind)
            if table != want:
                rep.err("wrong_table", (key, NAMES.get(kind), table))
                continue
            gt = row[0]
            if kind == KIND_GAP:
                continue  # a gap record's t is when it was made; not an event time
            if fl & FLAG_UNSYNCED:
                if gt != t and gt - t not in epochs.get((key[0], key[1]), ()):
                    rep.err("time_mismatch", (key, NAMES.get(kind), t, gt))
                if not row[1] & FLAG_UNSYNCED:
                    pass
            elif gt != t:
                rep.err("time_mismatch", (key, NAMES.get(kind), t, gt))
    for key, n in seen.items():
        if key not in truth and key[0] in devices:
            rep.err("unexpected", key + (where[key][0],))
    rep.counts["owed"] = len(truth)
    rep.counts["owed_by_kind"] = dict(sorted(by_kind.items()))
    rep.counts["delivered"] = delivered
    rep.counts["gap_covered"] = gap_cov
    rep.counts["gap_covered_by_kind"] = dict(sorted(gap_by_kind.items()))
    rep.counts["gap_seqs_reported"] = len(reported)
    rep.counts["held"] = nheld
    rep.counts["unsynced"] = unsynced
    rep.counts["quarantined"] = quarantined

    # 4. windows
    if windows:
        _check_windows(rep, q, windows, readings)
    else:
        rep.notes.append("no window config given: windows not checked")
    db.close()
    return rep


def _check_windows(rep, q, w, readings):
    size, offset, lateness = w["size_ms"], w.get("offset_ms", 0) % w["size_ms"], w["allowed_lateness_ms"]
    groups = []
    for g in w.get("groups") or []:
        devs = g.get("devices", ["*"])
        groups.append((g["name"], None if "*" in devs else set(devs), g["channel"]))
    late = set()
    nlate = 0
    for dev, boot, seq, t, ch, v, scope, key, wstart, wm, reason in q(
            "SELECT device, boot, seq, t, channel, value, scope, key, window_start, watermark, reason FROM late"):
        nlate += 1
        k = (dev, boot, seq)
        if k not in readings:
            rep.err("late_unknown_record", (k, scope, key))
            continue
        if (scope, key, k) in late:
            rep.err("late_twice", (k, scope, key))
        late.add((scope, key, k))
        if readings[k][0] != t or wstart != _start(t, size, offset):
            rep.err("late_bad_row", (k, t, wstart))
        if wm is None or not wstart + size - 1 + lateness <= wm:
            rep.err("late_not_late", (k, scope, key, "window end-1+lateness=%d watermark=%s"
                                      % (wstart + size - 1 + lateness, wm)))
    rep.counts["late_rows"] = nlate
    exp = {}
    for k, (t, ch, v) in readings.items():
        dev = k[0]
        st = _start(t, size, offset)
        targets = []
        if ("device", dev, k) not in late:
            targets.append(("device", dev, ch, st))
        for name, devs, gch in groups:
            if gch == ch and (devs is None or dev in devs) and ("group", name, k) not in late:
                targets.append(("group", name, ch, st))
        for wk in targets:
            a = exp.get(wk)
            if a is None:
                exp[wk] = [1, v, v * v, v, v]
            else:
                a[0] += 1
                a[1] += v
                a[2] += v * v
                if v < a[3]:
                    a[3] = v
                if v > a[4]:
                    a[4] = v
    got = {}
    fired = set()
    for scope, key, ch, start, end, rev, n, s, mn, mx, mean, std in q(
            "SELECT scope, key, channel, start, end, revision, count, sum, min, max, mean, std FROM window_results"):
        got[(scope, key, ch, start)] = (n, s, mn, mx, mean, std, rev, end)
        fired.add((scope, key, ch, start))
    merged = (q("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone() is not None
              and q("SELECT v FROM meta WHERE k = 'merged_partitions'").fetchone() is not None)
    _check_revisions(q, got, rep, merged=merged)
    nopen = 0
    for scope, key, ch, start, n, s, sq, mn, mx, rev in q(
            "SELECT scope, key, channel, start, count, sum, sumsq, min, max, revision FROM open_windows"):
        wk = (scope, key, ch, start)
        if wk in got:
            g = got[wk]
            if (g[0], g[1], g[2], g[3]) != (n, s, mn, mx) or rev != g[6]:
                rep.err("open_state_differs_from_result", (wk, (n, s, mn, mx, rev), g[:4] + (g[6],)))
        else:
            nopen += 1
            got[wk] = (n, s, mn, mx, None, None, rev, start + size)
    for wk, a in exp.items():
        g = got.get(wk)
        if g is None:
            rep.err("window_missing", (wk, a[0]))
            continue
        n, s, sq, mn, mx = a
        if (g[0], g[1], g[2], g[3]) != (n, s, mn, mx):
            rep.err("window_mismatch", (wk, "expected n=%d sum=%d min=%d max=%d" % (n, s, mn, mx),
                                        "got n=%d sum=%d min=%d max=%d" % g[:4]))
            continue
        if g[4] is not None:
            mean = s / n
            var = n * sq - s * s
            std = math.sqrt(var) / n if var > 0 else 0.0
            if not (math.isclose(g[4], mean, rel_tol=1e-9, abs_tol=1e-9)
                    and math.isclose(g[5], std, rel_tol=1e-9, abs_tol=1e-6)):
                rep.err("window_mismatch", (wk, "mean/std", (mean, std), (g[4], g[5])))
        if g[7] != wk[3] + size:
            rep.err("window_mismatch", (wk, "end", g[7]))
    devs = {k[0] for k in readings}
    for wk in got:
        if wk not in exp and (wk[0] == "group" or wk[1] in devs):
            rep.err("window_extra", (wk, got[wk][:4]))
    rep.counts["windows"] = len(exp)
    rep.counts["windows_fired"] = len([k for k in exp if k in fired])
    rep.counts["windows_open"] = len([k for k in exp if k not in fired])


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tools.groundtruth", description=__doc__.splitlines()[0])
    ap.add_argument("--version", action="version", version=_version_line("groundtruth"))
    ap.add_argument("--db", required=True, help="the gateway's SQLite file")
    ap.add_argument("--truth", required=True, nargs="+", help="truth file(s) written by tools/fleet.py")
    ap.add_argument("--window-ms", type=int, help="gateway windows.size_ms (default: from the truth file)")
    ap.add_argument("--offset-ms", type=int, default=0)
    ap.add_argument("--lateness-ms", type=int, help="gateway windows.allowed_lateness_ms")
    ap.add_argument("--gateway-config", help="the gateway's TOML: take [windows] from it")
    ap.add_argument("--strict-held", action="store_true", help="records still held on devices are errors")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    windows = None
    if a.gateway_config:
        sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.dirname(__file__)))
        from gateway.config import Config
        cfg = Config.load(a.gateway_config).as_dict()["windows"]
        windows = cfg
    elif a.window_ms:
        windows = {"size_ms": a.window_ms, "offset_ms": a.offset_ms,
                   "allowed_lateness_ms": a.lateness_ms or 0, "groups": []}
    rep = check(a.db, a.truth, windows, a.strict_held)
    if a.json:
        print(json.dumps({"ok": rep.ok, "counts": rep.counts, "errors": dict(rep.nerr)}, indent=2))
    else:
        print(rep.text())
    return 0 if rep.ok else 1



def _version_line(prog):
    from gateway.version import version_line
    return version_line(prog)


if __name__ == "__main__":
    sys.exit(main())
