"""A long outage on the real LittleFS: the device samples for DAYS simulated days and never gets
an ack (no network), at the default config, on littlefs-python configured like MicroPython's
ESP32 flash filesystem (tools/lfsfs.py: 2 MiB, 4096-byte blocks). Prints, every SIM hours,
the outbox's files, flash blocks in use, segments in the RAM index, gap records, records stored
and dropped; at the end the flash wear (erases per day: total and hottest block, years to the
100,000-cycle rating) and a reboot: the next boot's Outbox.load() on the same flash.

    python tools/outage_week.py [--days 7] [--every-h 12] [--config FILE.json] [--ack-every-s N]

The sampling loop is driven directly (App.sample_step / outbox tick / status record, as the
app's tasks do), on a virtual clock, so a week takes minutes, not a week.
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from firmware.app import App  # noqa: E402
from firmware.hal_sim import SimHal  # noqa: E402
from firmware.outbox import Outbox  # noqa: E402
from shared import wire_dev as wire  # noqa: E402
from tools.lfsfs import LfsFS  # noqa: E402

DAY_MS = 86400000
EPOCH = 1767225600000  # 2026-01-01
CYCLES = 100000  # rated erase cycles of the ESP32's SPI NOR flash

BASE_CONFIG = {"device_id": "node-01", "broker": {"host": "127.0.0.1"}, "insecure": True}


def snapshot(app, fs):
    ob = app.outbox
    d = ob.dir
    gaps = sum(s[9] for s in ob.segs)
    return {"files": len(fs.listdir(d)), "blocks": fs.used_blocks(), "segs": len(ob.segs),
            "gaps": gaps, "stored": ob.stored_records(), "bytes": ob.total_bytes(), "dropped": ob.dropped,
            "refused": ob.refused, "readings": app.c["readings"], "samples": app.c["samples"],
            "errors": app.c["errors"], "write_errors": ob.write_errors, "alerts": _alerts(ob)}


def _alerts(ob):
    return sum(s[8] for s in ob.segs)


def run(days=7.0, every_h=12, cfg=None, out=print, alert_every_s=0, ack_every_s=0):
    """Returns (rows, result). rows: snapshots every every_h simulated hours."""
    cfg = dict(cfg or BASE_CONFIG)
    fs = LfsFS()
    hal = SimHal(seed=5, speed=1e-12, epoch_ms=EPOCH, fs=fs, console=False)
    app = App(cfg, hal)
    app._boot()
    app.clock.set_time(EPOCH, "ntp")
    app._sync_pipeline()
    ob = app.outbox
    period = app.cfg["sample_ms"]
    status_ms = app.cfg["status_every_s"] * 1000
    total = int(days * DAY_MS) // period
    every = int(every_h * 3600000) // period
    rows = []
    last_status = 0
    t0 = time.time()
    for i in range(1, total + 1):
        hal.advance(period)
        app.sample_step()
        b = app.clock.boot_ms()
        try:
            ob.tick(b)
        except OSError:
            app.c["errors"] += 1
        if ack_every_s and b // 1000 % ack_every_s == 0 and ob.seq > ob.pending():
            ob.on_ack(app.boot, ob.seq - ob.pending() - 1)  # normal operation: the gateway acks
        if alert_every_s and b // 1000 % alert_every_s == 0:
            t, fl = app.clock.stamp_now()
            app._emit(wire.KIND_CEP, t, fl, ("test_alert", 2, 0, ()))
        if status_ms and b - last_status >= status_ms:
            last_status = b
            t, fl = app.clock.stamp_now()
            try:
                ob.append(wire.KIND_STATUS, t, fl, app.status_body(), b)
            except OSError:
                app.c["errors"] += 1
        if i % every == 0 or i == total:
            r = snapshot(app, fs)
            r["hours"] = round(i * period / 3600000.0, 1)
            rows.append(r)
            out("%6.1f h  files %4d  blocks %3d/%d  segs %4d  gaps %4d  alerts %4d  stored %6d  bytes %7d  "
                "dropped %8d  refused %7d  errors %d  (%.0f s)" % (
                    r["hours"], r["files"], r["blocks"], fs.blocks, r["segs"], r["gaps"], r["alerts"], r["stored"],
                    r["bytes"], r["dropped"], r["refused"], r["errors"] + r["write_errors"], time.time() - t0))
    ob.flush()
    sim_days = total * period / float(DAY_MS)
    er = fs.erases_per_block()
    hot = max(er)
    res = {"days": sim_days, "erases": sum(er), "erases_per_day": sum(er) / sim_days,
           "hottest_per_day": hot / sim_days, "years": (CYCLES / (hot / sim_days) / 365.0) if hot else float("inf"),
           "samples": app.c["samples"], "expected_samples": total}
    # the next boot on the same flash
    fs2 = fs.remount()
    ob2 = Outbox(fs2, app.boot + 1, app.cfg["outbox"]["dir"], app.cfg["outbox"]["max_bytes"],
                 app.cfg["outbox"]["segment_bytes"]).load()
    res["reboot_segs"] = len(ob2.segs)
    res["reboot_records"] = ob2.stored_records()
    res["reboot_torn"] = ob2.torn
    out("flash wear: %d erases in %.1f days = %.0f/day; hottest block %.1f erases/day -> %.1f years to %d cycles"
        % (res["erases"], sim_days, res["erases_per_day"], res["hottest_per_day"], res["years"], CYCLES))
    out("samples %d of %d rounds; next boot loads %d segments, %d records (%d torn)"
        % (res["samples"], total, res["reboot_segs"], res["reboot_records"], res["reboot_torn"]))
    return rows, res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--days", type=float, default=7.0)
    ap.add_argument("--every-h", type=float, default=12.0)
    ap.add_argument("--config", help="device config JSON (default: defaults, insecure, no pipeline rules)")
    ap.add_argument("--alert-every-s", type=int, default=0, help="also a CEP record every N s")
    ap.add_argument("--ack-every-s", type=int, default=0,
                    help="normal operation instead of an outage: everything flushed is acked every N s")
    a = ap.parse_args(argv)
    cfg = None
    if a.config:
        with open(a.config) as f:
            cfg = json.load(f)
    run(a.days, a.every_h, cfg, alert_every_s=a.alert_every_s, ack_every_s=a.ack_every_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
