"""Long run with retention: does the gateway's database stay the same size?

    .venv/bin/python tools/longrun_retention.py --devices 20 --duration 600 --keep-s 60

A mosquitto, the gateway (subprocess) with retention set to seconds, and a simulated fleet
(real firmware Apps). Every few seconds it prints the pages SQLite uses (page_count -
freelist_count, read through the WAL), the file sizes and the rows per table; at the end
the growth between the middle and the end of the run. With retention the used size levels
off once raw readings reach their age limit; without (--keep-s 0) it grows with the data.
"""
import argparse
import asyncio
import os
import sqlite3
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tools.fleet import Fleet, Site  # noqa: E402


def measure(db):
    """(used bytes, file bytes db+wal, {table: rows}) through a read-only connection."""
    c = sqlite3.connect("file:%s?mode=ro" % db, uri=True, timeout=2)
    try:
        ps = c.execute("PRAGMA page_size").fetchone()[0]
        used = (c.execute("PRAGMA page_count").fetchone()[0] - c.execute("PRAGMA freelist_count").fetchone()[0]) * ps
        rows = {t: c.execute("SELECT count(*) FROM %s" % t).fetchone()[0]
                for t in ("readings", "window_results", "device_windows", "device_status")}
        inserted = c.execute("SELECT coalesce(sum(received), 0) FROM devices").fetchone()[0]
    finally:
        c.close()
    files = sum(os.path.getsize(db + s) for s in ("", "-wal") if os.path.exists(db + s))
    return used, files, rows, inserted


def run(workdir, devices=8, duration=40.0, keep_s=4.0, sample_ms=50, every_s=2.0, broker=None, out=sys.stdout):
    """Returns the samples [(t, used, files, rows, received)]."""
    days = keep_s / 86400.0
    ret = {"readings_days": days, "results_days": 2 * days, "events_days": 2 * days, "interval_s": 1.0,
           "batch_rows": 1000} if keep_s else {}
    site = Site(workdir, broker=broker, window_ms=1000, lateness_ms=1000, ooo_ms=200, idle_ms=5000,
                gw_extra={"retention": ret, "store": {"synchronous": "NORMAL"}} if ret else
                {"store": {"synchronous": "NORMAL"}})
    samples = []

    async def go():
        fleet = Fleet(devices, site.port, None, seed=9, sample_ms=sample_ms, window_ms=1000,
                      cfg_over={"status_every_s": 2}, broker=site.mq)
        await fleet.start(stagger_s=0.5)
        t0 = time.monotonic()
        try:
            while time.monotonic() - t0 < duration:
                await asyncio.sleep(every_s)
                if not site.gateway_alive():
                    raise RuntimeError("gateway died: see %s/gateway.log" % site.dir)
                if os.path.exists(site.db):
                    used, files, rows, rec = measure(site.db)
                    t = time.monotonic() - t0
                    samples.append((t, used, files, rows, rec))
                    out.write("t=%5.1fs used %8.0f KiB  files %8.0f KiB  received %8d  rows %s\n" % (
                        t, used / 1024, files / 1024, rec, " ".join("%s=%d" % kv for kv in rows.items())))
                    out.flush()
        finally:
            await fleet.shutdown()
    try:
        site.start_broker().start_gateway()
        asyncio.run(go())
    finally:
        site.close()
    return samples


def growth(samples):
    """(used at the middle, used at the end, records received in the second half)."""
    mid = samples[len(samples) // 2]
    end = samples[-1]
    return mid[1], end[1], end[4] - mid[4]


def main(argv=None):
    p = argparse.ArgumentParser(prog="longrun_retention", description=__doc__.split("\n\n")[0])
    p.add_argument("--version", action="version", version=_version_line("longrun_retention"))
    p.add_argument("--devices", type=int, default=20)
    p.add_argument("--duration", type=float, default=300)
    p.add_argument("--keep-s", type=float, default=30, help="raw readings kept this long (0: retention off)")
    p.add_argument("--sample-ms", type=int, default=50)
    p.add_argument("--dir", default=None)
    a = p.parse_args(argv)
    d = a.dir or tempfile.mkdtemp(prefix="edgeflow-longrun-")
    s = run(d, a.devices, a.duration, a.keep_s, a.sample_ms, every_s=max(2.0, a.duration / 40))
    mid, end, rec = growth(s)
    print("used size: %.0f KiB at the middle, %.0f KiB at the end (%+.1f%%) while %d more records arrived"
          % (mid / 1024, end / 1024, 100.0 * (end - mid) / mid, rec))
    return 0



def _version_line(prog):
    from gateway.version import version_line
    return version_line(prog)


if __name__ == "__main__":
    sys.exit(main())
